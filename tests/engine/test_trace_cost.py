"""What tracing costs and when it is skipped (frostline.engine.frozen, runner).

* Hugging Face models trace with fx plus example values (``"fx-values"``): Python
  control flow on shapes takes the example's branch, torch.export is never called.
* That tracer refuses control flow on tensor contents, and a trace whose shape branches
  depend on the batch size fails its probe; a trace refuses inputs of other shapes.
* A layer that draws random numbers and certainly lies in the frozen part (frozen weights
  read what it draws) turns the cache off before anything is traced (the model runs
  whole, as ``cache=False`` would).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import hf_bert, hf_gpt2
from torch import nn

import frostline as fl
from frostline.engine import frozen
from frostline.engine.frozen import GraphError, partition, same_outputs, stochastic_frozen, trace
from frostline.engine.runner import OffReason, Runner
from frostline.engine.runner import splits as runner

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def no_export(monkeypatch) -> list:
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.export.export was called")

    monkeypatch.setattr(torch.export, "export", refuse)
    return calls


@pytest.mark.parametrize("build", [hf_bert, hf_gpt2], ids=["bert", "gpt2"])
def test_hugging_face_models_trace_without_torch_export(build, monkeypatch) -> None:
    calls = no_export(monkeypatch)
    torch.manual_seed(0)
    model, x = build().eval(), tokens()
    t = trace(model, x)
    assert t.backend == "fx-values" and not calls
    params = list(model.parameters())
    model.requires_grad_(False)
    for p in params[-2:]:
        p.requires_grad_(True)
    part = partition(t)
    assert part.frozen is not None
    assert same_outputs(part.trainable(*part.run_frozen(x)), model(**x))
    assert type(t.run(x)) is type(model(**x))  # the ModelOutput comes back, not a dict


class ShapeSwitch(nn.Module):
    """Branches on a static shape (plain fx cannot), on the batch size when asked."""

    def __init__(self, on_batch: bool = False) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.on_batch = on_batch

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[-1] == 6 and x.ndim == 2:
            h = h * 2
        if self.on_batch and x.size(0) > 2:
            h = h + 1
        return self.head(h)


def test_shape_branches_trace_with_fx_values(monkeypatch) -> None:
    calls = no_export(monkeypatch)
    model = ShapeSwitch()
    x = torch.randn(4, 6)
    t = trace(model, x)
    assert t.backend == "fx-values" and not calls
    model.a.requires_grad_(False)
    part = partition(t)
    assert part.boundary == ("mul",)
    for n in (1, 5):
        xs = torch.randn(n, 6)
        assert same_outputs(part.trainable(*part.run_frozen(xs)), model(xs))
    with pytest.raises(GraphError, match="per-sample shapes"):
        t.flat(torch.randn(4, 7))  # the branch was taken for 6 features


def test_a_branch_on_the_batch_size_is_not_baked_in() -> None:
    model = ShapeSwitch(on_batch=True)
    try:
        t = trace(model, torch.randn(4, 6))
    except GraphError:
        return  # refused: fine
    assert t.backend != "fx-values"  # the probe on 2 samples saw the other branch
    for n in (1, 2, 3, 5):
        xs = torch.randn(n, 6)
        assert same_outputs(t.run(xs), model(xs))


class ValueSwitch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # tensor contents: no tracer may take the example's branch
            return h
        return -h


def test_control_flow_on_tensor_contents_is_refused(monkeypatch) -> None:
    with pytest.raises(GraphError, match="fx-values: TraceError: Python control flow"):
        trace(ValueSwitch(), torch.randn(3, 4))


# ------------------------------------------------------------- cache off, untraced


class Untraceable(nn.Module):
    """fx cannot trace it (a branch on ``isinstance`` of a shape entry: proxies differ
    from ints); torch.export can."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(p, inplace=inplace))
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.mid(self.body(x))
        if isinstance(x.shape[1], int):
            h = h * 2
        return self.head(h)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((24, 6)).astype(np.float32), rng.integers(0, 3, 24)


def fit(module: nn.Module, cache, **kw):
    x, y = data()
    torch.manual_seed(0)
    model = fl.wrap(module)
    model.get_layer("body").trainable = False
    model.get_layer("mid").trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    h = model.fit(x, y, batch_size=8, epochs=2, seed=0, verbose=0, cache=cache, **kw)
    return model, h.history["loss"]


def counting_trace(monkeypatch) -> list:
    calls: list = []

    def counted(*args, **kwargs):
        calls.append(args)
        return frozen.trace(*args, **kwargs)

    monkeypatch.setattr(runner, "trace", counted)
    return calls


def test_stochastic_frozen_part_turns_the_cache_off_before_tracing(monkeypatch) -> None:
    torch.manual_seed(0)
    ref, ref_losses = fit(Untraceable(), cache=False)
    traced = counting_trace(monkeypatch)
    exported = no_export(monkeypatch)
    torch.manual_seed(0)
    model, losses = fit(Untraceable(), cache="auto")
    status = model.cache_status["train"]
    assert status.reason is OffReason.RANDOM, status
    assert status.detail == "layer 'body.2' draws random numbers (torch generator)", status
    assert not traced and not exported  # decided without tracing
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=0)  # the very same steps
    for a, b in zip(model.module.parameters(), ref.module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "case", ["inactive", "inplace", "frozen_inference"], ids=lambda c: c.replace("_", "-")
)
def test_the_precheck_leaves_cacheable_models_to_the_trace(case, monkeypatch) -> None:
    # p=0 keeps the cache on, and in inference mode the frozen part's dropout is off; an
    # in-place dropout may be recomputed after the frontier: the trace decides
    module = Untraceable(p=0.0 if case == "inactive" else 0.5, inplace=case == "inplace")
    kw = {"frozen_inference": True} if case == "frozen_inference" else {}
    traced = counting_trace(monkeypatch)
    model, _ = fit(module, cache="auto", **kw)
    assert traced
    status = model.cache_status["train"]
    assert status.cached or case == "inplace", status
    assert status.boundary  # split by the trace


def agrees_with_the_trace(net: nn.Module, x: torch.Tensor) -> str | None:
    why = stochastic_frozen(net, x)
    if why is not None:  # the pre-check may only say what the partition says
        assert partition(trace(net, x)).random is not None
    return None if why is None else str(why)


def test_precheck_says_nothing_where_trainable_computation_holds_the_layer() -> None:
    x = torch.randn(4, 4)
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2))
    assert agrees_with_the_trace(net, x) is None  # fed by a trainable layer
    net[0].requires_grad_(False)
    assert agrees_with_the_trace(net, x) is None  # feeds trainable computation only
    assert partition(trace(net, x)).random is None  # which runs it: the trainable side
    net[2].requires_grad_(False)
    assert agrees_with_the_trace(net, x) == "layer '1' draws random numbers (torch generator)"
    net.eval()
    assert agrees_with_the_trace(net, x) is None
    # inside a layer fx calls whole, which holds trainable weights: one trainable node
    enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.5, batch_first=True)
    net = nn.Sequential(nn.Linear(4, 4), enc, nn.Linear(4, 2))
    net[0].requires_grad_(False)
    seq = torch.randn(4, 5, 4)
    assert agrees_with_the_trace(net, seq) is None
    assert partition(trace(net, seq)).random is None
    enc.requires_grad_(False)
    assert agrees_with_the_trace(net, seq) is not None


class InputDrop(nn.Module):
    """Dropout on its (frozen) input, then a Linear; fx calls it whole, as a torch.nn layer."""

    __module__ = "torch.nn.modules.frostline_test"

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.lin = nn.Dropout(0.5), nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.drop(x))


def test_precheck_counts_a_layer_inside_a_whole_trainable_module_as_trainable() -> None:
    net = nn.Sequential(nn.Linear(4, 4), InputDrop(), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    x = torch.randn(4, 4)
    assert agrees_with_the_trace(net, x) is None
    assert partition(trace(net, x)).random is None  # one trainable node: cacheable
    net[1].lin.requires_grad_(False)
    assert agrees_with_the_trace(net, x) == "layer '1' draws random numbers (torch generator)"


def test_precheck_ignores_dropout_on_weights_alone() -> None:
    class WeightDrop(nn.Module):  # dropout on a frozen weight: not input-dependent
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4), requires_grad=False)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x @ self.drop(self.w))

    assert stochastic_frozen(WeightDrop(), torch.randn(4, 4)) is None


def test_precheck_leaves_no_hooks_and_no_state_change() -> None:
    net = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2)
    )
    net[:4].requires_grad_(False)
    stats, x = net[1].running_mean.clone(), torch.randn(4, 4)
    rng = torch.get_rng_state()
    assert stochastic_frozen(net, x) is not None
    assert torch.equal(net[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_precheck_sees_the_dropout_of_a_partly_unfrozen_transformer() -> None:
    # phase 2: the model and its encoder hold trainable weights (the last layer), but fx
    # traces through them: the embeddings' dropout is frozen, the cache off untraced
    torch.manual_seed(0)
    model, x = hf_bert().train(), tokens()
    model.requires_grad_(False)
    model.bert.encoder.layer[-1].requires_grad_(True)
    model.classifier.requires_grad_(True)
    why = stochastic_frozen(model, x)
    assert str(why) == "layer 'bert.embeddings.dropout' draws random numbers (torch generator)"
    assert partition(trace(model, x)).random is not None


# ------------------------------------------------- frozen_inference: one trace per fit


def fit_tokens(module: nn.Module, flags: list | None = None) -> list[float]:
    x = {k: v.numpy() for k, v in tokens_batch(16).items()}
    y = np.arange(16) % 3
    model = fl.wrap(module)
    model.trainable = False
    model.get_layer("classifier").trainable = True
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    class Modes(fl.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if flags is not None:
                flags.append(tuple(m.training for m in module.modules()))

    h = model.fit(
        x, y, batch_size=8, epochs=2, seed=0, verbose=0, frozen_inference=True, callbacks=[Modes()]
    )
    assert model.cache_status["train"].cached
    return h.history["loss"]


def tokens_batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[::3, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_frozen_inference_traces_once_in_the_final_modes(monkeypatch) -> None:
    traced = counting_trace(monkeypatch)
    torch.manual_seed(0)
    guessed_flags: list = []
    guessed = fit_tokens(hf_bert(), guessed_flags)
    assert len(traced) == 1  # the frozen modules were put in eval mode before tracing
    # without the guess: a trace in the modes as set, then one after the flip
    monkeypatch.setattr(runner, "frozen_calls", lambda module, example: [])
    traced.clear()
    torch.manual_seed(0)
    plain_flags: list = []
    plain = fit_tokens(hf_bert(), plain_flags)
    assert len(traced) == 2
    assert guessed_flags == plain_flags  # the same modules ran in inference mode
    np.testing.assert_allclose(guessed, plain, rtol=1e-6)


class InplaceFrontier(nn.Module):
    """The in-place ReLU after the frozen layer is recomputed on the trainable side: not a
    module of the frozen part, though it only ever sees frozen values."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.body(x)))


def test_a_wrong_guess_is_undone(monkeypatch) -> None:
    x, y = data()
    runs = []
    for guess in (True, False):
        if not guess:
            monkeypatch.setattr(runner, "frozen_calls", lambda module, example: [])
        torch.manual_seed(0)
        module = InplaceFrontier()
        model = fl.wrap(module)
        model.get_layer("body").trainable = False
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        modes: list = []

        class Modes(fl.callbacks.Callback):
            def __init__(self, module: InplaceFrontier, modes: list) -> None:
                super().__init__()
                self.module, self.modes = module, modes

            def on_train_batch_begin(self, batch, logs=None):
                self.modes.append((self.module.act.training, self.module.body.training))

        h = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            seed=0,
            verbose=0,
            frozen_inference=True,
            callbacks=[Modes(module, modes)],
        )
        runs.append((modes, h.history["loss"]))
    assert runs[0][0] == runs[1][0] and runs[0][0][0] == (True, False)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-6)


# ------------------------------------------------------------ shapes, not tensors


class SizeReader(nn.Module):
    """The trainable part reads only the shape of a frozen tensor (GPT-2's final view)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.ndim == 2:  # shape control flow: traced with example values
            e = self.embed(x)
        h = self.body(e)
        batch, width = e.size()
        return self.head(h).view(batch, -1) + e.shape[1] * 0 + width * 0


def test_a_shape_read_on_the_trainable_side_is_not_cached() -> None:
    model = SizeReader()
    model.embed.requires_grad_(False)
    model.body.requires_grad_(False)
    x = torch.randn(4, 6)
    t = trace(model, x)
    assert t.backend == "fx-values"
    part = partition(t)
    assert part.boundary == ("body",)  # not body + embed (whose shape the head reads)
    for n in (1, 3, 7):
        xs = torch.randn(n, 6)
        assert same_outputs(part.trainable(*part.run_frozen(xs)), model(xs))


class Headless(nn.Module):
    """A backbone whose classifier was replaced by nn.Identity (torchvision's headless
    recipe): the identity is recomputed after the frontier, so neither it nor the backbone
    module around it is a module of the frozen part."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.classifier = nn.Linear(6, 8), nn.Identity()

    def forward(self, x):
        return self.classifier(torch.relu(self.lin(x)))


def test_frozen_inference_guess_leaves_a_headless_backbone_alone(monkeypatch) -> None:
    x, y = data()
    traced = counting_trace(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(Headless(), nn.Linear(8, 3))
    model = fl.wrap(net)
    model.get_layer("0").trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    modes: list = []

    class Modes(fl.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            modes.append((net[0].training, net[0].classifier.training, net[0].lin.training))

    model.fit(x, y, batch_size=8, epochs=2, verbose=0, frozen_inference=True, callbacks=[Modes()])
    assert model.cache_status["train"].cached
    assert set(modes) == {(True, True, False)}  # as the split says: only `lin` is frozen
    assert len(traced) == 1  # the guess was right: no second trace


def test_the_frozen_inference_guess_runs_once_for_all_epochs(monkeypatch) -> None:
    """fit puts the model in train mode every epoch; the modules the first guess put in
    eval mode are flipped again from memory, without running the model with hooks."""
    calls: list = []
    real = runner.frozen_calls

    def counting(module, example):
        calls.append(1)
        return real(module, example)

    monkeypatch.setattr(runner, "frozen_calls", counting)
    torch.manual_seed(0)
    remembered_flags: list = []
    remembered = fit_tokens(hf_bert(), remembered_flags)
    assert len(calls) == 1
    assert len(set(remembered_flags)) == 1  # the same modes in every step of both epochs
    # the modes and losses of a fit without the guess (traced as set, then flipped)
    monkeypatch.setattr(runner, "frozen_calls", lambda module, example: [])
    torch.manual_seed(0)
    plain_flags: list = []
    plain = fit_tokens(hf_bert(), plain_flags)
    assert plain_flags == remembered_flags
    np.testing.assert_allclose(remembered, plain, rtol=1e-6)


class ValueBranch(nn.Module):
    """Control flow on tensor values: no tracer can go through it, so it becomes a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def test_a_second_trace_starts_where_the_first_succeeded(monkeypatch) -> None:
    attempts: list = []
    real = torch.fx.Tracer.trace

    def counted(self, root, *args, **kwargs):
        attempts.append(type(self).__name__)
        return real(self, root, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counted)
    # fx-values after plain fx failed on the shape branch: the retrace goes there directly
    model = SizeReader()
    x = torch.randn(4, 6)
    first = trace(model, x)
    assert first.backend == "fx-values" and len(attempts) == 2
    attempts.clear()
    model.eval()
    again = trace(model, x, like=first)
    assert again.backend == "fx-values" and len(attempts) == 1
    assert same_outputs(again.run(x), model(x))
    # leaves found by failing attempts are leaves from the start
    net = nn.Sequential(nn.Linear(6, 6), ValueBranch(), nn.Linear(6, 3))
    attempts.clear()
    first = trace(net, x)
    assert first.leaves == ("model.1",) and len(attempts) == 2
    attempts.clear()
    again = trace(net, x, like=first)
    assert again.leaves == ("model.1",) and len(attempts) == 1
    # another module's trace is no guide
    attempts.clear()
    other = trace(nn.Sequential(nn.Linear(6, 6), ValueBranch(), nn.Linear(6, 3)), x, like=first)
    assert other.leaves == ("model.1",) and len(attempts) == 2


@pytest.mark.parametrize("head", ["linear", "dropout"])
def test_a_split_runs_the_model_six_times(head: str) -> None:
    """The randomness watch is the probe's reference forward, and the probe's run of the
    graph is the draw watch: a split runs the frozen layers once in the watched forward,
    once more eagerly (the probe's second batch), twice as the graph (the probe's two
    batches) and twice as the frozen part (its batch-dependence check). It was eight runs
    (ten with a Dropout head): a forward of its own for each watch."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
    base.requires_grad_(False)
    drop = nn.Dropout(0.5) if head == "dropout" else nn.Identity()
    net = nn.Sequential(base, drop, nn.Linear(8, 3))
    runs: list = []
    base[0].register_forward_hook(lambda *a: runs.append(1))
    r = Runner(net)
    r.verify(torch.randn(8, 6))
    assert r.boundary == ("0.2",), r.status
    assert len(runs) == 6
    if head == "dropout":
        assert r.part is not None and r.part.traced.random_nodes() == {
            "model_1": ("torch generator",)
        }
