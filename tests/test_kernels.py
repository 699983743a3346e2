"""Kernel choice by measurement (`wm.kernels`) with fake timings, its cache, and the layers that use it;
the "auto" precision (`wm.precision`)."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from wm import kernels, precision
from wm.kernels import KernelCache, Selector, calibrate, decide, median_times


def fake_timer(times: dict[str, float], calls: list | None = None):
    """A timer that reports `times` (seconds) for the candidates it is given, without running them."""

    def timer(fns):
        if calls is not None:
            calls.append(sorted(fns))
        return {n: times[n] for n in fns}

    return timer


@pytest.fixture
def fake_selector():
    """Install a selector with an in-process cache and a settable fake timing table."""
    times: dict[str, float] = {}
    sel = Selector(KernelCache(None), timer=fake_timer(times))
    with kernels.using(sel):
        yield sel, times


# ----------------------------------------------------------------------------- the decision rule


def test_native_kept_unless_a_candidate_beats_it_by_the_margin():
    assert decide({"native": 1.0, "a": 0.95}, {"a": 0.0}, "native", 1e-4, margin=0.1) == "native"
    assert decide({"native": 1.0, "a": 0.90}, {"a": 0.0}, "native", 1e-4, margin=0.1) == "a"
    assert decide({"native": 1.0}, {}, "native", 1e-4) == "native"


def test_fastest_correct_candidate_wins_and_a_wrong_one_never_does():
    times = {"native": 1.0, "a": 0.6, "b": 0.3, "c": 0.1, "d": 0.05}
    errors = {"a": 1e-6, "b": 1e-5, "c": 0.5, "d": math.nan}  # c wrong, d not finite
    assert decide(times, errors, "native", 1e-4) == "b"
    assert decide(times, {"a": 1e-6}, "native", 1e-4) == "a"  # no error known: not a candidate
    assert decide(times, {n: 0.01 for n in times}, "native", {"b": 0.02, "c": 0.02}) == "c"  # per-name tol
    assert decide({"native": 1.0, "y": 0.5, "x": 0.5}, {"x": 0, "y": 0}, "native", 1e-4) == "x"  # tie: name
    with pytest.raises(ValueError, match="native"):
        decide({"a": 1.0}, {"a": 0.0}, "native", 1e-4)


def test_calibrate_checks_outputs_before_timing():
    x = torch.randn(8, 8)
    calls: list = []

    def broken():
        raise RuntimeError("unsupported")

    candidates = {"native": lambda: x * 2, "exact": lambda: x + x, "wrong": lambda: x * 3, "raises": broken}
    times = {"native": 1.0, "exact": 0.5, "wrong": 0.1, "raises": 0.01}
    record = calibrate(candidates, "native", 1e-4, fake_timer(times, calls))
    assert record["choice"] == "exact"
    assert calls == [["exact", "native"]]  # only correct candidates are timed
    assert set(record["rejected"]) == {"wrong", "raises"} and "unsupported" in record["rejected"]["raises"]
    assert record["rel_error"]["exact"] == 0 and record["rel_error"]["wrong"] == pytest.approx(0.5)
    assert record["us"] == {"native": 1e6, "exact": 5e5}


def test_median_times_with_a_fake_clock():
    now = [0.0]
    cost = {"a": [9.0, 1.0, 1.0, 1.0, 1.0, 1.0], "b": [9.0, 2.0, 50.0, 2.0, 2.0, 2.0]}  # warm-up, then rounds
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            now[0] += cost[name][calls[name]]
            calls[name] += 1

        return fn

    times = median_times({n: make(n) for n in cost}, rounds=5, warmup=1, clock=lambda: now[0])
    assert times == {"a": 1.0, "b": 2.0}  # the warm-up is untimed; the 50 s spike is outvoted
    assert calls == {"a": 6, "b": 6}
    calls.update(a=0, b=0)
    median_times({n: make(n) for n in cost}, rounds=5, warmup=1, clock=lambda: now[0], budget_s=1.0)
    assert calls == {"a": 4, "b": 4}  # over budget: stops after the minimum of 3 rounds


# ----------------------------------------------------------------------------- selector and cache


def counting(calls: list, name: str, value: torch.Tensor):
    def fn():
        calls.append(name)
        return value

    return fn


def test_cache_hit_skips_calibration_and_keys_on_the_machine(monkeypatch):
    y = torch.ones(3)
    times = {"native": 1.0, "fast": 0.5}
    sel = Selector(KernelCache(None), timer=fake_timer(times))
    calls: list = []
    cands = {"native": counting(calls, "native", y), "fast": counting(calls, "fast", y)}
    assert sel.choose("op a", cands, "native") == "fast"
    n = len(calls)
    assert n > 0
    times.update(fast=2.0)  # a new measurement would now choose native
    assert sel.choose("op a", cands, "native") == "fast"  # cache hit: nothing timed, the choice's
    assert sorted(calls[n:]) == ["fast", "native"]  # accuracy checked once on the call at hand
    assert sel.choose("op b", cands, "native") == "native"  # another shape key: calibrated again
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert sel.choose("op a", cands, "native") == "native"  # another thread count: calibrated again
    monkeypatch.setattr(kernels, "cpu_info", lambda: ("Another CPU", ()))
    assert sel.choose("op a", cands, "native") == "native"  # another CPU model: calibrated again
    assert f"Another CPU|no-bf16|torch {torch.__version__}|{threads + 1} threads" == kernels.machine_key()
    assert [src for *_, src in sel.log] == ["calibrated", "cache", "calibrated", "calibrated", "calibrated"]


def test_native_mode_and_spent_budget_measure_nothing():
    calls: list = []
    y = torch.ones(2)
    cands = {"native": counting(calls, "native", y), "fast": counting(calls, "fast", y)}
    timer = fake_timer({"native": 1.0, "fast": 0.1})
    sel = Selector(KernelCache(None), mode="native", timer=timer)
    assert sel.choose("op", cands, "native", default="fast") == "fast" and not calls
    sel = Selector(KernelCache(None), timer=timer, total_budget_s=0.0)
    assert sel.choose("op", cands, "native") == "native" and not calls
    assert sel.cache.get(f"{kernels.machine_key()}|op") is None  # not cached: a later process measures it
    with pytest.raises(ValueError, match="mode"):
        Selector(KernelCache(None), mode="fastest")


def test_disk_cache_shared_between_processes_and_corrupt_file_overwritten(tmp_path):
    path = tmp_path / "sub" / "kernels.json"
    y = torch.ones(2)
    cands = {"native": lambda: y, "fast": lambda: y}
    Selector(KernelCache(path), timer=fake_timer({"native": 1.0, "fast": 0.5})).choose("op", cands, "native")
    data = json.loads(path.read_text())
    ((key, record),) = data["entries"].items()
    assert data["format"] == 1 and key.endswith("|op") and record["choice"] == "fast"
    assert [p.name for p in path.parent.iterdir() if p != path] == ["kernels.json.lock"]  # no temporary file

    calls: list = []  # a new process (new cache object) reads the file: no calibration
    again = Selector(KernelCache(path), timer=fake_timer({"native": 1.0, "fast": 2.0}, calls))
    assert again.choose("op", cands, "native") == "fast" and not calls

    path.write_text("{not json")
    fresh = Selector(KernelCache(path), timer=fake_timer({"native": 1.0, "fast": 2.0}))
    with pytest.warns(RuntimeWarning, match="unreadable kernel cache") as caught:
        assert fresh.choose("op", cands, "native") == "native"  # recalibrated
        fresh.choose("op2", cands, "native")
    assert len(caught) == 1  # one warning, however often the file is read
    assert set(json.loads(path.read_text())["entries"]) == {key, key[: -len("op")] + "op2"}  # overwritten
    path.write_text(json.dumps({"format": 1, "entries": {"k": {"no choice": 1}}}))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert KernelCache(path).get("k") is None


def _write_keys(path: str, tag: str, barrier) -> None:
    cache = KernelCache(Path(path))
    barrier.wait()
    for i in range(100):
        cache.put(f"m|{tag} {i}", {"choice": "native", "us": {}, "rel_error": {}, "rejected": {}})


def test_processes_writing_the_disk_cache_at_once_lose_nothing(tmp_path):
    """Each write reads, merges and replaces the file: without a lock, one landing between another
    process's read and replace was lost."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_keys, args=(str(tmp_path / "k.json"), t, barrier)) for t in "AB"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(json.loads((tmp_path / "k.json").read_text())["entries"]) == 200


def test_a_process_writing_the_cache_keeps_the_newer_entries_of_another(tmp_path):
    """Each write merged the whole of this process's copy over the file: an entry another process had
    recalibrated since (a kernel found inaccurate, a new choice) went back to this one's old record."""
    path = tmp_path / "k.json"
    rec = {"us": {}, "rel_error": {}, "rejected": {}}
    KernelCache(path).put("m|op", {**rec, "choice": "int8"})
    a, b = KernelCache(path), KernelCache(path)
    assert a.get("m|op")["choice"] == "int8" and b.get("m|op")["choice"] == "int8"
    b.put("m|op", {**rec, "choice": "native"})  # recalibrated by the other process
    a.put("m|other", {**rec, "choice": "bf16"})
    entries = json.loads(path.read_text())["entries"]
    assert entries["m|op"]["choice"] == "native" and entries["m|other"]["choice"] == "bf16"
    assert a.get("m|op")["choice"] == "native"  # and this process now uses the newer record too


def test_two_threads_putting_at_once_lose_nothing(tmp_path):
    """Two threads calibrating one model at a cold start: an entry put while the other thread rebuilt
    the cache's memory copy was lost from it (kept as its own), and its next put raised KeyError out of
    the model's forward. The switch is forced where it hit: inside the rebuild."""
    import threading

    cache = KernelCache(tmp_path / "kernels.json")
    cache.get("x")  # the file read
    rebuilding, errors = threading.Event(), []

    class Paused(dict):  # the memory copy that thread A rebuilds ({**mem, **merged}) pauses it there
        def keys(self):
            copied = list(super().keys())
            if threading.current_thread().name == "A":
                rebuilding.set()
                time.sleep(0.3)  # thread B puts here (with a lock: after A)
            return copied

        def __iter__(self):  # (so that {**d} asks for keys())
            return iter(list(dict.keys(self)))

    cache._mem = Paused(cache._mem)

    def put(*keys: str) -> None:
        try:
            for key in keys:
                cache.put(key, {"choice": "native"})
        except Exception as e:  # noqa: BLE001 - the test's subject
            errors.append(e)

    a = threading.Thread(target=put, args=("a",), name="A")
    a.start()
    assert rebuilding.wait(5)
    b = threading.Thread(target=put, args=("b", "b2"), name="B")
    b.start()
    a.join()
    b.join()
    assert not errors and all(cache.get(k) == {"choice": "native"} for k in ("a", "b", "b2"))
    entries = json.loads((tmp_path / "kernels.json").read_text())["entries"]
    assert set(entries) == {"a", "b", "b2"}


def test_native_and_fp32_blocks_overlapping_in_two_threads_restore_everything():
    """A enters, B enters, A leaves, B leaves: B put back what A had set, and the process's selector
    stayed "native" and the model fp32 for good (a validation in a trainer thread beside inference)."""
    import threading

    from policies.diffusion.precision import fp32_inference, set_inference_precision
    from policies.diffusion.unet import ConditionalUnet1D, UNetConfig

    net = ConditionalUnet1D(UNetConfig(down_dims=(32, 64), step_embed_dim=16), 4, 8).eval()
    set_inference_precision(net, "auto")
    a_in, b_in, a_out, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def thread_a() -> None:
        with fp32_inference(net):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(5)
        with fp32_inference(net):
            b_in.set()
            a_out.wait(5)
            seen["in B after A left"] = net.final[1].inference_precision, kernels.selector().current_mode()

    with kernels.using(Selector(KernelCache(None))):
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen["in B after A left"] == ("fp32", "native")  # B's block still holds
        assert kernels.selector().current_mode() == "measure" and net.final[1].inference_precision == "auto"


def test_a_cached_choice_that_fails_on_the_call_at_hand_falls_back_to_native():
    """The cached kernel is re-run to check its accuracy on this call; an exception there (a layout or
    build it does not support) went up through the model's forward."""
    y = torch.ones(3)
    sel = Selector(KernelCache(None), timer=fake_timer({"native": 1.0, "fast": 0.5}))
    assert sel.choose("op", {"native": lambda: y, "fast": lambda: y}, "native") == "fast"

    def broken():
        raise RuntimeError("unsupported layout")

    assert sel.choose("op", {"native": lambda: y, "fast": broken}, "native") == "native"
    _, record, how = sel.log[-1]
    assert how == "failed here" and record["choice"] == "native"
    assert "unsupported layout" in record["rejected_here"]


def test_summary_counts_each_op_shape_once_by_its_kernel(tmp_path):
    """The summary a results file records: distinct keys per chosen kernel (cache hits included, a key
    chosen twice counted once), seconds spent, and whether the budget ran out."""
    y = torch.ones(2)
    cands = {"native": lambda: y, "int8": lambda: y, "bf16": lambda: y}
    times = {"native": 1.0, "int8": 0.2, "bf16": 0.5}
    sel = Selector(KernelCache(tmp_path / "k.json"), timer=fake_timer(times))
    assert sel.summary() == {
        "mode": "measure", "shapes": 0, "by_kernel": {}, "calibration_s": 0.0, "budget_exhausted": False
    }  # fmt: skip
    sel.choose("a", cands, "native")
    sel.choose("a", cands, "native")  # a layer that forgot its memo: the cache answers, same key
    sel.choose("b", {"native": cands["native"], "bf16": cands["bf16"]}, "native")
    sel.choose("c", cands, "native")
    times.update(int8=2.0, bf16=2.0)
    sel.choose("d", cands, "native")
    summary = sel.summary()
    assert summary["shapes"] == 4 and summary["by_kernel"] == {"bf16": 1, "int8": 2, "native": 1}
    assert summary["mode"] == "measure" and summary["calibration_s"] >= 0 and not summary["budget_exhausted"]
    sel.total_budget_s = 0.0
    assert sel.choose("e", cands, "native") == "native" and sel.summary()["budget_exhausted"]
    assert sel.summary()["shapes"] == 4  # unmeasured defaults are not choices


def test_cache_location_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("WM_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.default_cache_path() == tmp_path / "wm-stack" / "kernels.json"
    monkeypatch.setenv("WM_KERNEL_CACHE", str(tmp_path / "k.json"))
    assert kernels.default_cache_path() == tmp_path / "k.json"
    for off in ("off", "0", ""):
        monkeypatch.setenv("WM_KERNEL_CACHE", off)
        assert kernels.default_cache_path() is None
    monkeypatch.setenv("WM_KERNELS", "native")
    kernels.set_selector(None)
    try:
        assert kernels.selector().mode == "native" and kernels.selector().cache.path is None
    finally:
        kernels.set_selector(None)


def test_bad_environment_values_are_one_line_errors_and_no_home_keeps_choices_in_process(monkeypatch):
    monkeypatch.setenv("WM_KERNELS", "off")
    kernels.set_selector(None)
    try:
        with pytest.raises(ValueError, match=r"^WM_KERNELS must be one of .*'off'$"):
            kernels.selector()
    finally:
        kernels.set_selector(None)
    monkeypatch.setenv("WM_KERNEL_CACHE", "~no_such_user_wm/k.json")
    with pytest.raises(ValueError, match="^WM_KERNEL_CACHE='~no_such_user_wm/k.json': .*'off'") as info:
        kernels.default_cache_path()
    assert "\n" not in str(info.value)
    monkeypatch.delenv("WM_KERNEL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)  # no $HOME, no passwd entry: a container's arbitrary uid
    with pytest.warns(RuntimeWarning, match="no home directory"):
        assert kernels.default_cache_path() is None


def test_a_failed_cache_write_leaves_no_temporary_file_and_says_so(tmp_path):
    """The cache path is a directory: the read warns and so does the write (it warned once for both),
    and the temporary file the write made is removed."""
    (tmp_path / "kernels.json").mkdir()
    y = torch.ones(2)
    sel = Selector(KernelCache(tmp_path / "kernels.json"), timer=fake_timer({"native": 1.0, "fast": 0.5}))
    with pytest.warns(RuntimeWarning) as caught:
        assert sel.choose("op", {"native": lambda: y, "fast": lambda: y}, "native") == "fast"
    messages = [str(w.message) for w in caught]
    assert any("unreadable kernel cache" in m for m in messages)
    assert any("cannot write the kernel cache" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.json", "kernels.json.lock"]
    assert sel.cache.path is None  # the choice stays in this process


def test_rel_error_holds_at_any_magnitude():
    """In fp32 the reference's norm overflowed (outputs ~1e18: a 5 % error measured 0) or underflowed."""
    for scale in (1e18, 1e-25, 1.0):
        ref = torch.randn(4096) * scale
        assert kernels.rel_error(ref * 1.05, ref) == pytest.approx(0.05, rel=1e-3), scale
        assert kernels.rel_error(ref.clone(), ref) == 0.0
    zero = torch.zeros(3)
    assert kernels.rel_error(zero, zero) == 0.0 and kernels.rel_error(zero + 1e-30, zero) == math.inf
    assert kernels.rel_error(torch.ones(3), torch.tensor([1.0, math.inf, 1.0])) == math.inf
    assert kernels.rel_error(torch.empty(0, 4), torch.empty(0, 4)) == 0.0


def test_an_output_that_cannot_check_candidates_decides_nothing(tmp_path):
    """A NaN / inf input made every candidate look wrong: "native" was chosen, written to the disk
    cache and used by every later process; an all-zero or empty output makes every candidate look
    right. Such a call takes the default unmeasured and leaves nothing in the cache or the log; the
    first call that can check the candidates calibrates."""
    path = tmp_path / "k.json"
    calls: list = []
    sel = Selector(KernelCache(path), timer=fake_timer({"native": 1.0, "fast": 0.5}, calls))
    x = torch.randn(8)
    for bad in (x.clone().index_fill_(0, torch.tensor([3]), math.nan), x / 0.0, torch.zeros(8), x[:0]):
        cands = {"native": lambda bad=bad: bad * 2, "fast": lambda bad=bad: bad + bad}
        assert sel.choose("op", cands, "native", default="native") == "native"
    assert not calls and not sel.log and not path.exists()
    good = {"native": lambda: x * 2, "fast": lambda: x + x}
    assert sel.choose("op", good, "native") == "fast" and sel.log[-1][2] == "calibrated"
    again = Selector(KernelCache(path), timer=fake_timer({"native": 1.0, "fast": 0.5}, calls))
    nan = x.clone().index_fill_(0, torch.tensor([3]), math.nan)
    cands = {"native": lambda: nan * 2, "fast": lambda: nan + nan, "dflt": lambda: nan}
    assert again.choose("op", cands, "native", default="dflt") == "dflt"  # a cache hit it cannot check
    assert not again.log  # neither "inaccurate here" nor a choice
    assert again.choose("op", good, "native") == "fast" and again.log[-1][2] == "cache"
    assert json.loads(path.read_text())["entries"][again.log[-1][0]]["choice"] == "fast"


def test_a_nan_input_leaves_a_conv_layer_shape_undecided_on_disk(tmp_path):
    """The layer-level case: a NaN at a UNet conv's first call wrote "native" to the disk cache for
    its shape, so the next process ran fp32 although bf16 was asked for and measured faster."""
    from policies.diffusion import unet
    from policies.diffusion.precision import set_inference_precision

    times = dict(native=1.0, onednn=0.95, matmul=0.95, native_bf16=0.4, onednn_bf16=0.5, matmul_bf16=0.5)

    def layer() -> unet.Conv1d:
        torch.manual_seed(0)
        conv = unet.Conv1d(16, 24, 5, padding=2).eval()
        set_inference_precision(conv, "bf16")
        return conv

    x = torch.randn(1, 16, 16)
    bad = x.clone()
    bad[0, 3, 5] = math.nan
    with kernels.using(Selector(KernelCache(tmp_path / "k.json"), timer=fake_timer(times))), torch.no_grad():
        assert torch.isnan(layer()(bad)).any()
    with kernels.using(Selector(KernelCache(tmp_path / "k.json"), timer=fake_timer(times))) as sel:
        with torch.no_grad():
            layer()(x)
    assert [(r["choice"], how) for _, r, how in sel.log] == [("native_bf16", "calibrated")]


def test_a_layer_whose_first_call_cannot_check_calibrates_at_the_next_that_can():
    """The same layer, in the same process: its first call (a NaN input) took the default unmeasured and
    the layer remembered it for the shape, so no later call ever calibrated: the UNet conv and the
    transformer ran their bf16 paths for the whole process, never checked for speed or accuracy."""
    from policies.diffusion import unet
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser

    times = {"fp32": 0.5, "bf16": 1.0, "native": 0.5, "onednn": 1.0, "matmul": 1.0}
    times |= {"native_bf16": 1.0, "onednn_bf16": 1.0, "matmul_bf16": 1.0}  # fp32 is the faster here
    torch.manual_seed(0)
    net = TransformerDenoiser(TransformerConfig(dim=32, depth=1, heads=2, dropout=0.0), 2, 8, 16, 2).eval()
    conv = unet.Conv1d(16, 24, 5, padding=2).eval()
    x, t, cond, xc = torch.randn(1, 16, 2), torch.tensor([3.0]), torch.randn(1, 2, 8), torch.randn(1, 16, 16)
    bad_cond, bad_xc = cond.clone(), xc.clone()
    bad_cond[0, 0, 0] = bad_xc[0, 3, 5] = math.nan
    for layer, bad, good in ((net, (x, t, bad_cond), (x, t, cond)), (conv, (bad_xc,), (xc,))):
        set_inference_precision(layer, "bf16")
        with kernels.using(Selector(KernelCache(None), timer=fake_timer(times))) as sel, torch.no_grad():
            layer(*bad)
            assert not sel.log
            layer(*good)
            assert [how for _, _, how in sel.log] == ["calibrated"], type(layer).__name__
            assert sel.log[0][1]["choice"] in ("fp32", "native")  # measured: the faster one


# ----------------------------------------------------------------------------- the layers
# ----------------------------------------------------------------------------- the layers


def conv_layers():
    from policies.diffusion import unet

    torch.manual_seed(0)
    return [
        unet.Conv1d(16, 24, 5, padding=2),
        unet.Conv1d(24, 16, 3, stride=2, padding=1),
        unet.Conv1d(16, 8, 1),
        unet.ConvTranspose1d(16, 12, 4, stride=2, padding=1),
        unet.Linear(20, 24),
    ]


def layer_input(layer: nn.Module, batch: int) -> torch.Tensor:
    """(batch, in_features) for a linear layer, (batch, in_channels, 16) for a conv layer."""
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, layer.in_features)
    return torch.randn(batch, layer.in_channels, 16)


@pytest.mark.parametrize("batch", [1, 3])
def test_every_conv_kernel_computes_the_layer(batch):
    """Each kernel a layer may be given (fp32 and bf16) matches nn.Conv1d / nn.ConvTranspose1d /
    nn.Linear."""
    for layer in conv_layers():
        x = layer_input(layer, batch)
        with torch.enable_grad():
            ref = layer(x).detach()  # autograd on: nn.Conv1d's / nn.ConvTranspose1d's own forward
        with torch.no_grad():
            for name in layer.kernel_names("bf16"):
                y = layer.KERNELS[name](layer, x)
                assert y.dtype == torch.float32 and y.shape == ref.shape
                tol = kernels.BF16_TOL if name.endswith("_bf16") else 1e-5
                assert kernels.rel_error(y, ref) < tol, (layer.describe(), name)


def int8_layers():
    """Layers whose weight matrix (N, K) has N % 16 == 0; K is zero-padded to a multiple of 64."""
    from policies.diffusion import unet

    torch.manual_seed(0)
    return [
        unet.Conv1d(64, 32, 5, padding=2),  # (32, 320)
        unet.Conv1d(128, 16, 3, stride=2, padding=1),  # (16, 384)
        unet.Conv1d(64, 16, 1),  # (16, 64)
        unet.ConvTranspose1d(64, 16, 4, stride=2, padding=1),  # (64, 64)
        unet.Conv1d(2, 32, 5, padding=2),  # (32, 10): K padded to 64 (10 crashed PyTorch's kernel)
        unet.ConvTranspose1d(20, 12, 4, stride=2, padding=1),  # (48, 20)
        unet.Linear(260, 64),  # a FiLM layer: (64, 260)
    ]


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no int8 weight-only kernel")
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_kernel_computes_the_layer_where_it_fits(batch):
    for layer in int8_layers():
        assert layer.int8_fits()
        x = layer_input(layer, batch)
        with torch.enable_grad():
            ref = layer(x).detach()
        with torch.no_grad():
            y = layer.KERNELS["matmul_int8"](layer, x)
        q = layer.int8_weights()[0]
        assert q.shape[1] % 64 == 0 and not q[:, layer.weight_matrix().shape[1] :].any()
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert 1e-4 < kernels.rel_error(y, ref) < kernels.INT8_TOL, layer.describe()
    fits = {layer.describe(): layer.int8_fits() for layer in conv_layers()}
    assert list(fits.values()) == [False, True, False, True, False], fits  # N = 24, 16, 8, 48, 24


def test_int8_rows_quantization():
    w = torch.randn(6, 40)
    w[2] = 0.0
    q, scale = precision.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and q.is_contiguous() and scale.dtype == torch.float32
    assert q.abs().max() <= 127 and (q.abs().amax(1)[[0, 1, 3, 4, 5]] == 127).all()
    assert torch.equal(q[2], torch.zeros(40, dtype=torch.int8)) and scale[2] == 1.0
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # at most half a step per entry
    with pytest.raises(ValueError, match="2-D float"):
        precision.quantize_int8_rows(torch.randn(2, 3, 4))


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no int8 weight-only kernel")
def test_int8_weights_only_with_auto_and_follow_the_weights(fake_selector):
    """int8 weights are a candidate with "auto" (taken here because the fake timings make it fastest),
    never with "fp32" or "bf16"; its quantized copy is rebuilt when the fp32 weights change."""
    from policies.diffusion.precision import set_inference_precision

    sel, times = fake_selector
    torch.manual_seed(0)
    times.update(native=1.0, onednn=0.9, matmul=0.9, native_bf16=0.9, onednn_bf16=0.9, matmul_bf16=0.9)
    times.update(matmul_int8=0.2)
    for layer in int8_layers():
        layer.eval()
        x = layer_input(layer, 1)
        with torch.no_grad():
            ref = layer(x)  # "fp32": int8 is not offered
            assert "matmul_int8" not in sel.log[-1][1]["us"]
            set_inference_precision(layer, "bf16")
            layer(x)
            assert "matmul_int8" not in sel.log[-1][1]["us"] and sel.log[-1][1]["choice"] != "native"
            set_inference_precision(layer, "auto")
            y = layer(x)
            record = sel.log[-1][1]
            assert record["choice"] == "matmul_int8", (layer.describe(), record)
            assert sel.log[-1][0].endswith("+int8") and 0 < kernels.rel_error(y, ref) < kernels.INT8_TOL
            layer.weight.mul_(-2.0)  # as an optimizer step or load_state_dict would
            y2 = layer(x)
            set_inference_precision(layer, "fp32")
            ref2 = layer(x)
        assert kernels.rel_error(y2, ref2) < kernels.INT8_TOL


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no int8 weight-only kernel")
def test_a_cached_reduced_precision_choice_is_checked_on_the_weights_it_meets(tmp_path):
    """int8 was measured accurate on one checkpoint's weights and cached (on disk, and in the layer's
    memo); another checkpoint of the same shapes, whose weights int8 cannot carry (a large weight on an
    input channel that is zero in the data), ran int8 at a relative error of 1.0. The timing is reused,
    the accuracy is checked again on the weights at hand."""
    from policies.diffusion import unet
    from policies.diffusion.precision import set_inference_precision

    times = dict(native=1.0, onednn=0.95, matmul=0.95, native_bf16=0.9, onednn_bf16=0.9, matmul_bf16=0.9)
    times.update(matmul_int8=0.2)
    x = torch.randn(1, 64, 16)
    x[:, 0] = 0.0

    def layer(outlier: bool) -> unet.Conv1d:
        torch.manual_seed(0)
        conv = unet.Conv1d(64, 32, 5, padding=2).eval()
        if outlier:
            with torch.no_grad():
                conv.weight[:, 0] = 50.0
        set_inference_precision(conv, "auto")
        return conv

    def run(conv: unet.Conv1d, sel: Selector) -> tuple[float, str, str]:
        """The relative error of the layer's "auto" output, its kernel and how it was chosen."""
        with torch.no_grad():
            y = conv(x)
            _, record, how = sel.log[-1]
            set_inference_precision(conv, "fp32")
            ref = conv(x)
            set_inference_precision(conv, "auto")
        return kernels.rel_error(y, ref), record["choice"], how

    with kernels.using(Selector(KernelCache(tmp_path / "k.json"), timer=fake_timer(times))) as sel:
        err, choice, how = run(layer(outlier=False), sel)
        assert (choice, how) == ("matmul_int8", "calibrated") and err < kernels.INT8_TOL
    with kernels.using(Selector(KernelCache(tmp_path / "k.json"), timer=fake_timer(times))) as sel:
        other = layer(outlier=True)  # another process, another checkpoint: a cache hit
        err, choice, how = run(other, sel)
        assert (choice, how) == ("native", "inaccurate here") and err < kernels.INT8_TOL
        with torch.no_grad():  # the same layer given the first checkpoint's weights: int8 again
            other.weight.copy_(layer(outlier=False).weight)
        err, choice, how = run(other, sel)
        assert (choice, how) == ("matmul_int8", "cache") and err < kernels.INT8_TOL


def test_a_module_in_training_mode_runs_fp32_and_calibrates_nothing(fake_selector):
    """Dropout on: a calibration would compare two different draws, reject bf16 and cache that for
    every later eval call; a training-mode module computes fp32."""
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser

    sel, times = fake_selector
    times.update(fp32=1.0, bf16=0.5)
    net = TransformerDenoiser(TransformerConfig(dim=32, depth=1, heads=2, dropout=0.5), 2, 8, 16, 2).train()
    set_inference_precision(net, "bf16")
    args = (torch.randn(1, 16, 2), torch.tensor([3.0]), torch.randn(1, 2, 8))
    with torch.no_grad():
        net(*args)
        assert not sel.log
        net.eval()
        net(*args)
    assert sel.log[-1][1]["choice"] == "bf16"


def test_conv_layers_use_the_measured_kernel(fake_selector):
    """The fastest correct kernel by the (fake) timings runs; a kernel with a wrong output never does;
    one key per shape, dtype, precision and batch; nothing is measured with autograd on."""
    from policies.diffusion import unet
    from policies.diffusion.precision import set_inference_precision

    sel, times = fake_selector
    layer = unet.Conv1d(16, 24, 5, padding=2).eval()
    calls: list = []
    good, wrong = unet.Conv1d.KERNELS["matmul_bf16"], lambda m, x: 1.5 * nn.Conv1d.forward(m, x)
    spy = lambda m, x: calls.append("spy") or good(m, x)  # noqa: E731
    kernels_ = dict(unet.Conv1d.KERNELS, matmul_bf16=spy, native_bf16=wrong)
    layer.KERNELS = kernels_
    times.update(native=1.0, onednn=0.95, matmul=0.92, native_bf16=0.1, onednn_bf16=0.8, matmul_bf16=0.5)
    x = torch.randn(1, 16, 16)
    with torch.enable_grad():
        ref = layer(x)
    assert not sel.log  # autograd on: PyTorch's forward, no calibration
    set_inference_precision(layer, "bf16")
    with torch.no_grad():
        y = layer(x)
        assert sel.log[-1][1]["choice"] == "matmul_bf16" and "native_bf16" in sel.log[-1][1]["rejected"]
        calls.clear()
        torch.testing.assert_close(layer(x), y)
        assert calls == ["spy"]  # memoized: the chosen kernel runs, nothing is measured again
        set_inference_precision(layer, "fp32")
        assert torch.equal(layer(x), nn.Conv1d.forward(layer, x))  # fp32: nothing beat native by 10 %
        layer(torch.randn(2, 16, 16))
    assert kernels.rel_error(y, ref) < kernels.BF16_TOL
    keys = [k.split("|")[-1] for k, _, src in sel.log if src == "calibrated"]
    assert len(keys) == len(set(keys)) == 3
    assert any("x=1x16x16 torch.float32 bf16" in k for k in keys)
    assert any("x=1x16x16 torch.float32 fp32" in k for k in keys)
    assert any("x=2x16x16" in k for k in keys)


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no int8 weight-only kernel")
def test_unet_on_int8_weights_stays_close(fake_selector):
    """A UNet whose every fitting layer takes int8 weights (the fake timings make it fastest) stays
    within the whole-network tolerance of fp32; layers that do not fit keep an fp32 kernel."""
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.unet import ConditionalUnet1D, UNetConfig

    sel, times = fake_selector
    times.update(native=1.0, onednn=1.0, matmul=1.0, native_bf16=1.0, onednn_bf16=1.0, matmul_bf16=1.0)
    times.update(matmul_int8=0.1)
    torch.manual_seed(0)
    net = ConditionalUnet1D(UNetConfig(down_dims=(32, 64, 256), step_embed_dim=32), 2, 2 * 8).eval()
    x, t, cond = torch.randn(1, 16, 2), torch.tensor([42.0]), torch.randn(1, 2, 8)
    with torch.no_grad():
        ref = net(x, t, cond)
        set_inference_precision(net, "auto")
        y = net(x, t, cond)
    choices = {key.split("|")[-1]: record["choice"] for key, record, _ in sel.log if key.endswith("+int8")}
    assert choices and set(choices.values()) == {"matmul_int8"}
    assert any(key.startswith("linear 48->") for key in choices)  # the FiLM layers too
    assert any(not key.endswith("+int8") for key, _, _ in sel.log)  # the last conv: N = 2 (N % 16 != 0)
    assert 1e-4 < kernels.rel_error(y, ref) < kernels.MODULE_BF16_TOL


def test_setting_the_precision_again_drops_every_cached_copy_of_the_weights():
    """A write the version counter does not see (`p.data.copy_`, a hand-written EMA) left the stacked
    FiLM layers (cached even in fp32) on the old weights, with nothing said; setting the inference
    precision again is the documented refresh, and it left them."""
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.unet import ConditionalUnet1D, UNetConfig

    torch.manual_seed(0)
    net = ConditionalUnet1D(UNetConfig(down_dims=(32, 64, 256), step_embed_dim=32), 2, 2 * 8).eval()
    x, t, cond = torch.randn(1, 16, 2), torch.tensor([42.0]), torch.randn(1, 2, 8)
    set_inference_precision(net, "fp32")
    with kernels.mode("native"), torch.no_grad():
        net(x, t, cond)  # the stacked FiLM layers cached
        for p in net.parameters():
            p.data.copy_(torch.randn_like(p) * 0.1)  # unseen by the version counters
        set_inference_precision(net, "fp32")
        y = net(x, t, cond)
    with torch.enable_grad():
        ref = net(x, t, cond).detach()  # every block's own layers, the new weights
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_the_film_layers_run_as_one_product_at_inference(fake_selector):
    """At inference the residual blocks' FiLM layers run as one product of the conditioning with their
    stacked weights: the same output as each block's own layer (autograd on), one kernel choice for all,
    nothing of it in the state dict, and stacked again when a block's weights change."""
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.unet import ConditionalUnet1D, ResBlock1D, UNetConfig

    sel, times = fake_selector
    times.update(native=1.0, onednn=1.0, matmul=1.0, native_bf16=0.5, onednn_bf16=1.0, matmul_bf16=1.0)
    torch.manual_seed(0)
    net = ConditionalUnet1D(UNetConfig(down_dims=(32, 64, 256), step_embed_dim=32), 2, 2 * 8).eval()
    films = [m.film[1] for m in net.modules() if isinstance(m, ResBlock1D)]
    x, t, cond = torch.randn(1, 16, 2), torch.tensor([42.0]), torch.randn(1, 2, 8)
    keys = set(net.state_dict())
    for change in (False, True):
        if change:
            with torch.no_grad():
                films[3].weight.mul_(-2.0)
        with torch.enable_grad():
            ref = net(x, t, cond).detach()  # each block's own FiLM layer
        with torch.no_grad():
            y = net(x, t, cond)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert set(net.state_dict()) == keys
    set_inference_precision(net, "bf16")  # the stacked layer follows the blocks' setting
    with torch.no_grad():
        y = net(x, t, cond)
    linear = [(k.split("|")[-1], r) for k, r, _ in sel.log if k.split("|")[-1].startswith("linear ")]
    total = sum(f.out_features for f in films)
    assert len(linear) == 1 and linear[0][0].startswith(f"linear 48->{total} "), linear
    assert linear[0][1]["choice"] == "native_bf16" and kernels.rel_error(y, ref) < kernels.MODULE_BF16_TOL


def test_linear_layers_use_the_measured_kernel(fake_selector):
    from wm.predictor import _ONEDNN_LINEAR, linear

    sel, times = fake_selector
    torch.manual_seed(0)
    layer = nn.Linear(32, 48)
    x = torch.randn(2, 3000, 32)  # 6000 rows: calibrated on 4096 of them
    times.update(native=1.0, onednn=0.5)
    with torch.enable_grad():
        linear(x, layer)
    assert not sel.log  # autograd on: F.linear, nothing measured
    with torch.no_grad():
        for gelu in (False, True):
            ref = nn.functional.gelu(layer(x)) if gelu else layer(x)
            torch.testing.assert_close(linear(x, layer, gelu=gelu), ref, atol=1e-5, rtol=1e-5)
    choices = {k.split("|")[-1]: r["choice"] for k, r, _ in sel.log}
    want = "onednn" if _ONEDNN_LINEAR else "native"
    assert set(choices.values()) == {want} and all("rows~4096" in k for k in choices)
    assert len(choices) == 2  # with and without GELU


def test_rotary_positions_on_the_projection_rows_only_where_measured_faster(monkeypatch):
    """The predictor rotates its query / key projection rows instead of q and k where that measured
    faster (per frame count, row bucket and dtype); both agree with the autograd path (which rotates q
    and k), in `forward` and in rollouts from frame 0 and from a far frame index; the cached rows follow
    an in-place weight change."""
    from wm.predictor import Attention, KVCache, Predictor, PredictorConfig

    calls = []  # one entry per call of the rows path (each key's calibration checks it once)
    rows_path = Attention._qkv_rows
    monkeypatch.setattr(Attention, "_qkv_rows", lambda *a: calls.append(1) or rows_path(*a))

    def make(seed: int) -> Predictor:
        torch.manual_seed(seed)
        sizes = dict(dim=32, depth=2, heads=4, head_dim=8, mlp_dim=64, max_frames=3)
        return Predictor(PredictorConfig(in_dim=12, out_dim=10, **sizes)).eval()

    def rollout(model: Predictor, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        cache, outs = KVCache(next_frame=start), []
        for t in range(x.shape[1]):
            out, cache = model.step(x[:, t], (2, 3), cache)
            outs.append(out)
        return torch.stack(outs, dim=1)

    x = torch.randn(4, 5, 6, 12)
    for rows_time, want in ((0.5, "rows"), (2.0, "activations")):
        model, fresh = make(0), make(5)
        calls.clear()
        timings = dict(native=1.0, onednn=1.0, activations=1.0, rows=rows_time, sdpa=1.0, bmm=1.0)
        sel = Selector(KernelCache(None), timer=fake_timer(timings))
        with kernels.using(sel), torch.enable_grad():
            ref = model(x, (2, 3)).detach()
        with kernels.using(sel), torch.no_grad():
            torch.testing.assert_close(model(x, (2, 3)), ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(rollout(model, x), ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(rollout(model, x, start=1000), ref, atol=1e-4, rtol=0)
            for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
                p.copy_(q)  # the rows cached above are now stale
            torch.testing.assert_close(model(x, (2, 3)), fresh(x, (2, 3)), atol=1e-6, rtol=0)
            torch.testing.assert_close(rollout(model, x, start=1000), fresh(x, (2, 3)), atol=1e-4, rtol=0)
        rope = {key.split("|")[-1]: r for key, r, _ in sel.log if key.split("|")[-1].startswith("rope")}
        assert {r["choice"] for r in rope.values()} == {want}
        assert {key.split(" rows~")[0] for key in rope} == {"rope 5x6 32->64", "rope 1x6 32->64"}
        assert all(r["rel_error"]["rows"] < 1e-5 for r in rope.values())
        assert (len(calls) > len(rope)) == (want == "rows")  # the rows path ran beyond its calibration


def test_attention_through_two_products_only_where_measured_faster(monkeypatch):
    """The predictor's unmasked inference attention runs as two matrix products and a softmax where
    that measured faster than SDPA (per lengths, heads, batch bucket and dtype), agreeing with the
    autograd path (SDPA) in `forward` and rollouts; masked attention and `onednn=False` never measure."""
    from wm import predictor
    from wm.predictor import KVCache, Predictor, PredictorConfig

    calls = []  # one entry per call of the two-product path (each key's calibration checks it once)
    bmm = predictor._attention_bmm
    monkeypatch.setitem(predictor._ATTENTION_KERNELS, "bmm", lambda *a: calls.append(1) or bmm(*a))

    def make(**kw) -> Predictor:
        torch.manual_seed(0)
        sizes = dict(dim=32, depth=2, heads=4, head_dim=8, mlp_dim=64, max_frames=3)
        return Predictor(PredictorConfig(in_dim=12, out_dim=10, **sizes, **kw)).eval()

    x = torch.randn(4, 3, 6, 12)
    for bmm_time, want in ((0.5, "bmm"), (0.95, "sdpa")):
        model = make()
        calls.clear()
        timings = dict(native=1.0, onednn=1.0, activations=1.0, rows=1.0, sdpa=1.0, bmm=bmm_time)
        sel = Selector(KernelCache(None), timer=fake_timer(timings))
        with kernels.using(sel), torch.enable_grad():
            ref = model(x, (2, 3)).detach()
        assert not sel.log  # autograd: nothing measured
        with kernels.using(sel), torch.no_grad():
            torch.testing.assert_close(model(x, (2, 3)), ref, atol=1e-5, rtol=0)
            cache, outs = KVCache(), []
            for t in range(x.shape[1]):
                out, cache = model.step(x[:, t], (2, 3), cache)
                outs.append(out)
            torch.testing.assert_close(torch.stack(outs, dim=1), ref, atol=1e-5, rtol=0)
        att = {key.split("|")[-1]: r for key, r, _ in sel.log if key.split("|")[-1].startswith("attention")}
        assert {r["choice"] for r in att.values()} == {want}
        # forward's frame blocks (query frame t against keys of frames 0..t) and the rollout's steps
        assert {key.split(" batch~")[0] for key in att} == {f"attention 4x8 q6 k{6 * n}" for n in (1, 2, 3)}
        # forward's keys are views of the projection, the rollout's cached ones joined copies: timed apart
        assert {key.split(" k ")[-1] for key in att} == {"strided", "contiguous"}
        assert all(r["rel_error"]["bmm"] < 1e-5 for r in att.values())
        assert (len(calls) > len(att)) == (want == "bmm")  # the two products ran beyond their calibration
    for kw in (dict(onednn=False), dict(attention="masked")):
        calls.clear()
        sel = Selector(KernelCache(None), timer=fake_timer(dict(timings, bmm=0.1)))
        with kernels.using(sel), torch.no_grad():
            make(**kw)(x, (2, 3))
        assert not [key for key, _, _ in sel.log if "attention" in key] and not calls
    calls.clear()
    sel = Selector(KernelCache(None), timer=fake_timer(dict(timings, bmm=0.1)))
    with kernels.using(sel), torch.no_grad():
        make()(x[:0], (2, 3))  # an empty batch: nothing to measure on, nothing remembered
    assert not sel.log and not calls


def test_bf16_attention_products_only_within_the_logits_they_were_checked_on(monkeypatch):
    """In bf16 the two-product attention rounds its scores before the softmax, so its error grows with
    the logits: a layer that chose it runs SDPA for a call whose logits may reach more than
    `_LOGIT_SLACK` x further than at its check, and a candidate must come within half the bf16 tolerance."""
    from wm import predictor
    from wm.predictor import Attention, PredictorConfig

    calls = []
    bmm = predictor._attention_bmm
    monkeypatch.setitem(predictor._ATTENTION_KERNELS, "bmm", lambda *a: calls.append(1) or bmm(*a))
    cfg = PredictorConfig(in_dim=32, out_dim=32, dim=32, depth=1, heads=4, head_dim=16, mlp_dim=64)
    att = Attention(cfg).eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 16, generator=g).bfloat16() for _ in range(3))
    sel = Selector(KernelCache(None), timer=fake_timer(dict(sdpa=1.0, bmm=0.5)))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with kernels.using(sel), torch.no_grad():
        out = att.sdpa(q, k, v)
        assert len(calls) == 2  # the accuracy check and this call
        assert kernels.rel_error(out, sdpa(q, k, v)) < kernels.BF16_TOL / 2
        assert out.transpose(1, 2).is_contiguous()  # SDPA's (B, Lq, H, hd) layout
        att.sdpa(q * 1.2, k, v)  # within the slack: still the two products
        assert len(calls) == 3
        far = att.sdpa(q * 3, k * 3, v)  # logits 9x further: SDPA, exactly
        assert len(calls) == 3 and torch.equal(far, sdpa(q * 3, k * 3, v))
    (record,) = [r for key, r, _ in sel.log if "attention" in key]
    assert record["choice"] == "bmm" and "k strided" not in next(key for key, _, _ in sel.log)
    strict = Selector(KernelCache(None), timer=fake_timer(dict(sdpa=1.0, bmm=0.5)))
    att2 = Attention(cfg).eval()
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0) * 7  # a direction q, k share
    with kernels.using(strict), torch.no_grad():  # logits offset by ~12: 1.5 % from SDPA, within 2 %
        att2.sdpa((q.float() + u).bfloat16(), (k.float() + u).bfloat16(), v)
    (record,) = [r for key, r, _ in strict.log if "attention" in key]
    assert record["choice"] == "sdpa" and kernels.BF16_TOL / 2 < record["rel_error"]["bmm"] < kernels.BF16_TOL


def test_whole_network_bf16_only_where_measured_faster(fake_selector):
    from policies.diffusion.precision import set_inference_precision
    from policies.diffusion.transformer import TransformerConfig, TransformerDenoiser

    sel, times = fake_selector
    torch.manual_seed(0)
    net = TransformerDenoiser(TransformerConfig(dim=32, depth=1, heads=2, dropout=0.0), 2, 8, 16, 2).eval()
    set_inference_precision(net, "bf16")
    args = (torch.randn(1, 16, 2), torch.tensor([3.0]), torch.randn(1, 2, 8))
    times.update(fp32=1.0, bf16=0.95)  # not faster by the margin: fp32
    with torch.no_grad():
        ref = net.denoise(*args)
        assert torch.equal(net(*args), ref)
    faster = Selector(KernelCache(None), timer=fake_timer({"fp32": 1.0, "bf16": 0.5}))
    with kernels.using(faster), torch.no_grad():  # another machine: bf16 faster
        low = net(*args)
        assert faster.log[-1][1]["choice"] == "bf16"
    with torch.enable_grad():
        assert torch.equal(net(*args), ref)  # autograd on: fp32
    assert not torch.equal(low, ref) and kernels.rel_error(low, ref) < kernels.MODULE_BF16_TOL


def test_image_backbone_runs_channels_last_frames_on_a_channels_last_copy_where_measured_faster():
    """Frames permuted from (H, W, 3) reach the backbone channels-last, where PyTorch's convolutions with
    contiguous weights copy every weight at every call: a channels-last copy of the network (or the frames
    made contiguous) is measured beside it, in fp32 too, and follows the weights it was made from."""
    import copy

    from policies.diffusion.obs_encoder import ObsEncoderConfig, ResNetKeypoints
    from policies.diffusion.precision import fp32_inference, set_inference_precision

    torch.manual_seed(0)
    enc = ResNetKeypoints(ObsEncoderConfig(image_size=(40, 40), crop=None)).eval()
    frames = torch.rand(2, 40, 40, 3).permute(0, 3, 1, 2)  # (N, 3, H, W) channels-last, as from a camera
    assert kernels.layout(frames) == "channels_last" and kernels.layout(frames.contiguous()) == "contiguous"
    times = {"fp32": 1.0, "fp32_nhwc": 0.5, "fp32_nchw": 0.8}
    calls: list = []
    sel = Selector(KernelCache(None), timer=fake_timer(times, calls))
    with kernels.using(sel), torch.no_grad():
        with torch.enable_grad():
            ref = enc(frames)  # autograd on: the network as it is, nothing measured
        assert not sel.log
        out = enc(frames)
        assert calls == [["fp32", "fp32_nchw", "fp32_nhwc"]]  # "fp32" by the setting: no bf16 candidates
        (key, record, _) = sel.log[-1]
        assert record["choice"] == "fp32_nhwc" and "channels_last" in key
        assert kernels.rel_error(out, ref) < kernels.FP32_TOL
        conv = enc._nhwc["fp32"](enc.backbone)[0]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert conv.weight.dtype == torch.float32
        enc(frames.contiguous())  # contiguous frames: their own key, and no "made contiguous" candidate
        assert calls[-1] == ["fp32", "fp32_nhwc"] and "contiguous" in sel.log[-1][0]
        with torch.no_grad():
            enc.backbone[0].weight.add_(torch.randn_like(enc.backbone[0].weight))  # an in-place step
        with torch.enable_grad():
            ref2 = enc(frames)
        assert kernels.rel_error(enc(frames), ref2) < kernels.FP32_TOL and kernels.rel_error(ref2, ref) > 1e-3
        with fp32_inference(enc):  # PyTorch's kernels as they are
            assert torch.equal(enc(frames), ref2)
    twin = copy.deepcopy(enc)  # its own, empty copies of the same kinds
    assert twin._nhwc["fp32"] is not enc._nhwc["fp32"] and twin._nhwc["bf16"].channels_last
    assert twin._nhwc["fp32"]._copy is None and enc._nhwc["fp32"]._copy is not None
    set_inference_precision(enc, "fp32")  # drops every cached copy
    assert enc._nhwc["fp32"]._copy is None
    even = {"fp32": 1.0, "fp32_nhwc": 0.95, "fp32_nchw": 0.99}
    slower = Selector(KernelCache(None), timer=fake_timer(even))
    with kernels.using(slower), torch.no_grad():  # another machine: nothing beats the native path
        assert torch.equal(enc(frames), ref2) and slower.log[-1][1]["choice"] == "fp32"


# ----------------------------------------------------------------------------- "auto" precision


def test_auto_precision_follows_the_hardware(monkeypatch):
    precision._auto.cache_clear()
    try:
        monkeypatch.setattr(precision, "cpu_info", lambda: ("Some CPU", ("amx_bf16",)))
        assert precision.resolve_precision("auto", "cpu") == "bf16"
        precision._auto.cache_clear()
        monkeypatch.setattr(precision, "cpu_info", lambda: ("Old CPU", ()))
        assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"
        assert (
            precision.resolve_precision("bf16", "cpu") == "bf16"
            and precision.resolve_precision("fp32") == "fp32"
        )
        if not torch.cuda.is_available():
            assert precision.resolve_precision("auto", "cuda") == "fp32"
        assert "no bf16 units" in precision.describe_hardware()
        # an A100 beside a T4: torch's is_bf16_supported() counts the T4's emulated bf16 (slower than
        # fp32), and the first GPU's answer was kept for every GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: {0: (8, 0), 1: (7, 5)}[i])
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        assert [precision.resolve_precision("auto", d) for d in ("cuda:0", "cuda:1", "cuda")] == [
            "bf16",
            "fp32",
            "fp32",
        ]
    finally:
        precision._auto.cache_clear()
    assert precision.check_precision("auto", allow_auto=True) == "auto"
    with pytest.raises(ValueError, match="precision"):
        precision.check_precision("auto")  # the trainer's names: what runs
    with pytest.raises(ValueError, match="precision"):
        precision.check_precision("fp16", allow_auto=True)


def test_cpu_info_tells_cpus_of_one_name_apart():
    """The kernel cache is keyed on it: a VM's "AMD EPYC" names several generations, and ARM has no
    model name at all (a Graviton and a Raspberry Pi shared one key)."""
    x86 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
    x86 += "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert precision.parse_cpuinfo(x86) == ("AMD EPYC (family 25 model 17 stepping 1)", ("avx512_bf16",))
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    arm += "CPU variant\t: 0x1\n"
    model, flags = precision.parse_cpuinfo(arm)
    assert model.endswith("(implementer 0x41 part 0xd40 variant 0x1)") and flags == ()
    assert precision.parse_cpuinfo(arm.replace("0xd40", "0xd08"))[0] != model  # another core


def test_cpu_info_reads_bf16_flags():
    model, flags = precision.cpu_info()
    assert model and set(flags) <= set(precision.BF16_CPU_FLAGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_precision("auto") in ("fp32", "bf16")


def test_summary_since_a_mark_counts_only_what_came_after(tmp_path):
    """One job of several in a process (a -m sweep) reports its own choices and seconds alone."""
    y = torch.ones(2)
    cands = {"native": lambda: y, "int8": lambda: y}
    sel = Selector(KernelCache(tmp_path / "k.json"), timer=fake_timer({"native": 1.0, "int8": 0.2}))
    sel.choose("a", cands, "native")
    sel.spent_s += 5.0  # the earlier job's calibration
    mark = sel.mark()
    sel.choose("b", {"native": cands["native"]}, "native")  # one candidate: no choice logged
    sel.choose("c", cands, "native")
    since = sel.summary(since=mark)
    assert since["shapes"] == 1 and since["by_kernel"] == {"int8": 1}
    assert 0 <= since["calibration_s"] < 5.0 and sel.summary()["shapes"] == 2


def test_calibration_stops_the_compute_clock():
    """A shape's first call calibrates (once, up to seconds): wm-eval counted that as planning time; the
    compute clock, which the planners and policies time and budget on, stands still for it."""

    def slow_timer(fns):
        time.sleep(0.3)  # what timing the candidates takes
        return {"native": 1.0, "fast": 0.5}

    x = torch.randn(8, 8)
    cands = {"native": lambda: x * 2, "fast": lambda: x + x}
    wall, compute = time.monotonic(), kernels.compute_clock()
    with kernels.using(Selector(KernelCache(None), timer=slow_timer)) as sel:
        assert sel.choose("op", cands, "native") == "fast"
    assert time.monotonic() - wall >= 0.3 and kernels.compute_clock() - compute < 0.1


def test_a_calibration_inside_another_stops_the_compute_clock_once():
    """A candidate that runs layers of its own (the predictor's rotary projection runs its linear layers)
    calibrated theirs inside its own calibration: that time came off the compute clock twice, and
    wm-eval reported a negative planning time."""

    def slow_timer(fns):
        time.sleep(0.2)
        return {"native": 1.0, "fast": 0.5}

    x = torch.randn(8, 8)
    with kernels.using(Selector(KernelCache(None), timer=slow_timer)) as sel:
        inner = {"native": lambda: x * 2, "fast": lambda: x + x}

        def outer_native():
            sel.choose("inner", inner, "native")  # its first call: calibrated inside the outer one's
            return x * 3

        wall, compute = time.monotonic(), kernels.compute_clock()
        assert sel.choose("outer", {"native": outer_native, "fast": lambda: x + x + x}, "native") == "fast"
        elapsed = time.monotonic() - wall
    assert elapsed >= 0.4 and kernels.compute_clock() - compute > -0.02
    assert sel.spent_s <= elapsed
