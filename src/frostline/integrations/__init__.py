"""frostline inside other training loops.

* :mod:`frostline.integrations.lightning` — ``FreezeCallback`` for ``lightning.Trainer``
  (needs the ``[lightning]`` extra).
* :mod:`frostline.integrations.huggingface` — ``FreezeCallback`` for the Hugging Face
  ``transformers.Trainer`` (needs the ``[huggingface]`` extra).
* :mod:`frostline.integrations.driver` — what both share: the schedules
  (:mod:`frostline.freezing`), optimizer tracking, verification and resume state.

Plain loops need no integration: ``fl.track(optimizer, model)``.

This package imports neither lightning nor transformers; each submodule imports its
own library when it is imported.
"""
