"""The harness's Funnel sweep (``--preset funnel``): pooled attention pooled in the kernel or first, the Funnel
layer of both of Hugging Face's attention types against the fused one, a training step's backward (the
layer's weights included); and the deprecated ``python -m bench.bench_funnel``, which runs it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench import bench_attention, bench_funnel
from bench.cases import FUNNEL_TYPES, PRESETS, Case, expand
from bench.ops import OPS
from bench.providers import PROVIDERS
from bench.runner import STATUS_OK, STATUS_SKIPPED, make_inputs, timed_call
from bench.validate import grad_targets

pytest.importorskip("transformers")

FUNNEL = Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=64, seqlen_k=64, headdim=16, dtype="fp32", causal=False,
              mode="fwd+bwd", device="cpu", op="funnel", stride=2, pattern="factorized")


def test_funnel_preset():
    cases = expand(PRESETS["funnel"], "cpu")
    assert {(c.op, c.seqlen_q) for c in cases} == {("pooled", 512), ("pooled", 2048), ("funnel", 256),
                                                   ("funnel", 1024)}
    assert {c.pattern for c in cases if c.op == "funnel"} == set(FUNNEL_TYPES)
    assert FUNNEL.op_label() == "funnel/2 factorized"
    assert dataclasses.replace(FUNNEL, pattern="relative_shift").op_label() == "funnel/2"


def test_backward_differentiates_the_layer_weights():
    context = OPS["funnel"].context(FUNNEL)
    sets = make_inputs(FUNNEL, 0)
    for provider in ("naive", "effattn"):
        fn = PROVIDERS[provider].build(FUNNEL, context, sets[0])
        targets = grad_targets(fn, sets[0].args)
        assert len(targets) > 1 and targets[0] is sets[0].args[0]
        grads = timed_call(FUNNEL, fn, sets)()
        assert len(grads) == len(targets)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        assert grad_targets(lambda x: x, sets[0].args) == sets[0].args  # no weights: the args alone


def test_sweep_both_attention_types_and_pooling_first(tmp_path):
    rc = bench_attention.main(["--preset", "funnel", "--device", "cpu", "--seqlen", "64", "--heads", "2",
                               "--headdim", "16", "--providers", "naive", "sdpa", "effattn", "effattn-prepool",
                               "effattn-features", "--min-run-time", "0.002", "--no-ceilings", "--no-plots",
                               "--quiet", "--stem", "funnel", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "funnel.json").read_text())["rows"]
    ran = {(r["op"], r["pattern"], r["mode"], r["provider"]) for r in rows if r["status"] == STATUS_OK}
    for mode in ("fwd", "fwd+bwd"):
        for provider in ("naive", "sdpa", "effattn", "effattn-prepool"):
            assert ("pooled", "", mode, provider) in ran
        for attention_type in FUNNEL_TYPES:
            assert {("funnel", attention_type, mode, p) for p in ("naive", "effattn", "effattn-features")} <= ran
    assert all(r["status"] == STATUS_SKIPPED for r in rows if r["op"] == "funnel" and r["provider"] == "sdpa")
    assert not any(r["op"] == "funnel" and r["provider"] == "effattn-prepool" for r in rows)
    funnel = [r for r in rows if r["op"] == "funnel" and r["status"] == STATUS_OK]
    for r in funnel:  # vs naive is against Hugging Face's layer of the same attention type
        naive = next(n for n in funnel if n["provider"] == "naive" and n["pattern"] == r["pattern"]
                     and n["mode"] == r["mode"])
        assert r["speedup_naive"] == pytest.approx(naive["ms"] / r["ms"])


@pytest.mark.parametrize("old, new", [
    ([], ["--preset", "funnel"]),
    (["--preset", "h100"], ["--preset", "h100-funnel"]),
    (["--parts", "pooled", "--device", "cpu"], ["--preset", "funnel", "--device", "cpu", "--op", "pooled"]),
    (["--parts", "funnel"], ["--preset", "funnel", "--op", "funnel", "--seqlen", "256", "1024", "--heads", "4",
                             "--batch", "1", "--headdim", "64"]),
])
def test_old_options_become_the_harness_arguments(old, new, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = bench_funnel.harness_argv([*old, "--out", str(tmp_path)])
    expected = [*new, "--stem", "funnel", "--out", str(tmp_path)]
    assert sorted(argv) == sorted(expected) and argv[:2] == expected[:2]
    bench_attention.build_parser().parse_args(argv)


def test_old_funnel_part_alone_runs_the_layer_cases_only():
    parser = bench_attention.build_parser()
    args = parser.parse_args(bench_funnel.harness_argv(["--parts", "funnel", "--device", "cpu"]))
    cases = expand(bench_attention.resolve_sweep(args), "cpu")
    assert {c.op for c in cases} == {"funnel"} and {c.seqlen_q for c in cases} == {256, 1024}
    assert {c.pattern for c in cases} == set(FUNNEL_TYPES)


@pytest.mark.parametrize("args", [["--parts", "nope"], ["--preset", "tiny"], ["--device", "tpu"]])
def test_old_command_bad_arguments(args, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_funnel.main(["--out", str(tmp_path), *args])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
