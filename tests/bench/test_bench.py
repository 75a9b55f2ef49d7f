"""The benchmark harness (``python -m bench``): end to end on a tiny preset, FLOP counts, argument errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest
import torch

from bench import bench_attention
from bench.cases import FUNNEL_OPS, OP_NAMES, PRESETS, Case, expand
from bench.flops import attention_flops, visible_pairs
from bench.ops import OPS
from bench.providers import PROVIDERS, NotSupportedError, Provider
from bench.runner import STATUS_ERROR, STATUS_OK, STATUS_OOM, STATUS_SKIPPED, STATUS_WRONG, Progress, Row, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_STATUSES = {"ok", "skipped", "WRONG", "OOM", "error"}
TORCH_PROVIDERS = ("naive", "sdpa")  # torch's own code: any failure of theirs here is the harness's
DEVICE = os.environ.get("EFFATTN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _run_cli(tmp_path, *args):
    rc = bench_attention.main(["--preset", "tiny", "--seqlen", "64", "--out", str(tmp_path), "--quiet", *args])
    return rc, json.loads((tmp_path / "attention.json").read_text())


def _case(row):
    return Row(**row).case()


def _check_rows(rows, device):
    for row in rows:
        assert row["status"] in ROW_STATUSES, row
        case = _case(row)
        cost = OPS[case.op].cost(case, OPS[case.op].context(case))
        assert row["flops"] == cost.flops(row["mode"]) and row["bytes"] == cost.bytes(row["mode"]), row
        if row["op"] == "attention":
            assert row["flops"] == attention_flops(row["batch"], row["heads_q"], row["seqlen_q"], row["seqlen_k"],
                                                   row["headdim"], row["causal"], row["mode"])
        if row["status"] == STATUS_OK:
            assert row["ms"] > 0 and row["gbps"] > 0, row
            assert (row["tflops"] is None) == (row["op"] == "predict"), row
            assert row["tflops"] is None or row["tflops"] > 0, row
            assert (row["kept"] is not None) == (row["op"] in ("sparse", "predict")), row
        else:
            assert row["reason"], row
        if row["provider"].startswith("sdpa") and row["op"] in FUNNEL_OPS:  # no Funnel layer built on SDPA
            assert row["status"] == STATUS_SKIPPED and "Funnel" in row["reason"], row
        elif row["provider"] in TORCH_PROVIDERS:
            assert row["status"] == STATUS_OK, row
        if row["provider"].startswith("effattn") or row["provider"].startswith("sdpa"):
            assert row["status"] in (STATUS_OK, STATUS_SKIPPED), row  # never WRONG, OOM or error here
        assert row["device"] == device
    _check_speedups(rows)


def _check_speedups(rows):
    """speedup_naive = naive's time / the row's; speedup_peer = the fastest torch peer's time / the row's."""
    by_case = {}
    for r in rows:
        by_case.setdefault(_case(r), []).append(r)
    for group in by_case.values():
        ok = {r["provider"]: r for r in group if r["status"] == STATUS_OK}
        peers = [r for name, r in ok.items() if PROVIDERS[name].peer]
        for r in ok.values():
            if "naive" in ok:
                assert r["speedup_naive"] == pytest.approx(ok["naive"]["ms"] / r["ms"])
            if peers:
                best = min(peers, key=lambda p: p["ms"])
                assert r["best_peer"] == best["provider"]
                assert r["speedup_peer"] == pytest.approx(best["ms"] / r["ms"])


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def test_cli_tiny_cpu_writes_valid_files(tmp_path, capsys):
    rc, doc = _run_cli(tmp_path, "--device", "cpu")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "provider" in printed and "TFLOP/s" in printed

    meta, rows = doc["metadata"], doc["rows"]
    for key in ("hostname", "device_name", "torch", "python", "date_utc", "command", "git_commit", "timing"):
        assert key in meta
    assert meta["device"] == "cpu" and "--preset tiny" in meta["command"]
    assert meta["ceilings"]["matmul_tflops"] > 0 and meta["ceilings"]["copy_gbps"] > 0
    cases = [c for c in expand(PRESETS["tiny"], "cpu") if c.seqlen_k == 64]  # decode: Tq = 1
    assert len(rows) == sum(case.op in p.ops for case in cases for p in PROVIDERS.values())
    _check_rows(rows, "cpu")
    assert {r["provider"] for r in rows if r["status"] == STATUS_SKIPPED} >= {"effattn-triton", "flex"}
    naive_ok = [r for r in rows if r["provider"] == "naive" and r["status"] == STATUS_OK]
    assert all(r["speedup_naive"] == pytest.approx(1.0) for r in naive_ok)
    assert all(r["best_peer"] == "sdpa" for r in naive_ok if r["op"] in ("attention", "pooled", "sparse"))
    # every op ran, effattn (or its predictors) included
    for op in OP_NAMES:
        ran = {r["provider"] for r in rows if r["op"] == op and r["status"] == STATUS_OK}
        assert "naive" in ran and ran & {"effattn", "gate", "sparsefinder"}, (op, ran)
    assert {r["stride"] for r in rows if r["op"] == "pooled"} == {2}
    assert {r["pattern"] for r in rows if r["op"] == "sparse"} == {"random", "documents"}
    assert "effattn" in printed.split("Summary:")[1]

    with (tmp_path / "attention.csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"provider", "mode", "ms", "tflops", "peak_mib", "hostname", "torch", "date_utc"} <= set(csv_rows[0])
    assert [r["provider"] for r in csv_rows] == [r["provider"] for r in rows]

    markdown = (tmp_path / "attention.md").read_text()
    assert markdown.startswith("# ")
    assert "| provider | op | mode |" in markdown and "|---|" in markdown and "## Summary" in markdown
    summary = (tmp_path / "attention_summary.md").read_text()  # the summary alone, for a README
    assert summary.startswith("Measured on ") and meta["torch"] in summary and "| effattn" in summary

    pngs = sorted(tmp_path.glob("*.png"))
    if importlib.util.find_spec("matplotlib") is None:
        assert not pngs
    else:
        assert [p.name for p in pngs] == ["attention_memory.png", "attention_roofline.png", "attention_sparse.png",
                                          "attention_tflops.png", "attention_time.png"]
        assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)


def test_cli_backward_alone(tmp_path):
    rc, doc = _run_cli(tmp_path, "--device", "cpu", "--mode", "bwd", "--no-plots", "--no-ceilings",
                       "--providers", "naive", "sdpa", "effattn")
    assert rc == 0
    assert {r["mode"] for r in doc["rows"]} == {"bwd"}
    _check_rows(doc["rows"], "cpu")
    assert not list(tmp_path.glob("*.png"))


def test_cli_time_budget_skips_the_rest(tmp_path):
    rc, doc = _run_cli(tmp_path, "--device", "cpu", "--time-budget", "1e-9", "--no-plots", "--no-ceilings")
    assert rc == 0
    assert doc["rows"] and all(r["status"] == STATUS_SKIPPED for r in doc["rows"][1:])
    assert any("time budget" in r["reason"] for r in doc["rows"])


def test_cli_one_op_and_its_axes(tmp_path):
    rc, doc = _run_cli(tmp_path, "--device", "cpu", "--op", "pooled", "sparse", "--stride", "3", "--pattern",
                       "random", "--sparsity", "0.25", "0.75", "--block", "32", "--mode", "fwd", "--no-plots",
                       "--no-ceilings", "--providers", "naive", "effattn")
    assert rc == 0
    rows = doc["rows"]
    _check_rows(rows, "cpu")
    assert {(r["op"], r["stride"]) for r in rows if r["op"] == "pooled"} == {("pooled", 3)}
    sparse = [r for r in rows if r["op"] == "sparse"]
    assert {(r["sparsity"], r["block"]) for r in sparse} == {(0.25, 32), (0.75, 32)}
    assert all(r["status"] == STATUS_OK for r in rows)
    # the random masks keep round((1 - sparsity) * nKb) of 2 kv blocks per q block
    assert sorted({r["kept"] for r in sparse}) == [0.5, 1.0]


def test_progress_bar(capsys):
    import io

    stream = io.StringIO()
    meter = Progress(total=4, stream=stream)
    case = expand(PRESETS["tiny"], "cpu")[0]
    row = Row.for_case("naive", case, OPS[case.op].cost(case, None))
    row.ms = 1.5
    for _ in range(2):
        meter.report(case, row)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[#####" + "." * 15 + "] 1/4") and "s left" in lines[0]
    assert lines[1].startswith("[" + "#" * 10 + "." * 10 + "] 2/4") and "1.500 ms" in lines[1]


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_tiny_cuda(tmp_path):
    providers = [name for name in PROVIDERS if name != "flex"]  # flex compiles per shape: too slow here
    rc, doc = _run_cli(tmp_path, "--device", "cuda", "--seqlen", "128", "--no-plots", "--providers", *providers)
    assert rc in (0, 1)
    _check_rows(doc["rows"], "cuda")
    assert doc["metadata"]["device_name"] == torch.cuda.get_device_name()


class _FakeProvider(Provider):
    """A provider whose call does something wrong, to check that the sweep reports it and goes on."""

    def __init__(self, name, behaviour):
        self.name, self.behaviour = name, behaviour

    def build(self, case, context=None, sample=None):
        def attn(q, k, v):
            if self.behaviour == "wrong":
                return torch.zeros_like(q)
            if self.behaviour == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
            if self.behaviour == "unsupported":
                raise NotSupportedError("head dim 32 not supported")
            raise ValueError("broken provider")

        return attn


def test_sweep_reports_failures_and_goes_on(monkeypatch):
    behaviours = {"wrong": STATUS_WRONG, "oom": STATUS_OOM, "unsupported": STATUS_SKIPPED, "error": STATUS_ERROR}
    for behaviour in behaviours:
        monkeypatch.setitem(PROVIDERS, f"fake-{behaviour}", _FakeProvider(f"fake-{behaviour}", behaviour))
    case = expand(PRESETS["tiny"], "cpu")[0]
    names = [f"fake-{b}" for b in behaviours] + ["sdpa"]
    rows = run_sweep([case], names, timing=PRESETS["tiny"].timing, progress=False)
    assert [r.status for r in rows] == [*behaviours.values(), STATUS_OK]
    for row in rows[:-1]:
        assert row.ms is None and row.reason
    assert "out of atol" in rows[0].reason and "64.00 GiB" in rows[1].reason and "head dim" in rows[2].reason


# ----------------------------------------------------------------------------------------------
# FLOP counts
# ----------------------------------------------------------------------------------------------
def _brute_force_pairs(tq, tk, causal):
    """Count (i, j) with key j visible to query i; causal is bottom-right aligned: j <= i + tk - tq."""
    return sum(1 for i in range(tq) for j in range(tk) if not causal or j <= i + tk - tq)


@pytest.mark.parametrize("tq, tk", [(1, 1), (3, 5), (5, 3), (7, 7), (1, 9), (9, 1), (4, 37), (37, 4), (64, 64),
                                    (33, 100), (100, 33), (0, 5), (5, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_visible_pairs_brute_force(tq, tk, causal):
    assert visible_pairs(tq, tk, causal) == _brute_force_pairs(tq, tk, causal)


def test_visible_pairs_against_mask():
    """Same count as the keys effattn's naive attention gives weight to (its output against V = I is P)."""
    from effattn.reference import naive_attention

    for tq, tk in ((6, 10), (10, 6), (8, 8)):
        q = torch.randn(1, 1, tq, 4, dtype=torch.float64)
        k = torch.randn(1, 1, tk, 4, dtype=torch.float64)
        identity = torch.eye(tk, dtype=torch.float64)[None, None]
        probs = naive_attention(q, k, identity, window_right=0, diag_offset=tk - tq)
        assert int((probs > 0).sum()) == visible_pairs(tq, tk, True)


def test_attention_flops_convention():
    B, H, T, D = 2, 8, 1024, 64
    dense = attention_flops(B, H, T, T, D, causal=False)
    assert dense == 4 * B * H * T * T * D
    assert attention_flops(B, H, T, T, D, causal=True) == 4 * B * H * D * T * (T + 1) // 2
    assert attention_flops(B, H, T, T, D, causal=False, mode="bwd") == dense * 5 // 2
    assert attention_flops(B, H, T, T, D, causal=False, mode="fwd+bwd") == dense * 7 // 2
    with pytest.raises(ValueError, match="mode"):
        attention_flops(B, H, T, T, D, causal=False, mode="sideways")


# ----------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, named", [
    (["--providers", "nope"], "--providers"),
    (["--preset", "nope"], "--preset"),
    (["--dtype", "fp8"], "--dtype"),
    (["--seqlen", "0"], "--seqlen"),
    (["--mode", "sideways"], "--mode"),
    (["--causal", "maybe"], "--causal"),
    (["--batch", "2", "--tokens", "4096"], "--tokens"),
    (["--heads", "6", "--gqa", "4"], "--gqa"),
    (["--op", "convolution"], "--op"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--block", "24"], "--block"),
    (["--pattern", "checkerboard"], "--pattern"),
    (["--stride", "0"], "--stride"),
])
def test_bad_arguments(args, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_attention.main(["--device", "cpu", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_asked_for_without_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_attention.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_micro_benchmark_suite_runs(tmp_path):
    """The pytest-benchmark suite under bench/ (separate from this suite) collects and runs: one variant per op."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_micro.py", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--benchmark-json", str(tmp_path / "micro.json"), "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
         "-k", "effattn and 256 and fwd and not bwd"],
        cwd=root, env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},  # not an xdist worker
                       "PYTHONPATH": root, "BENCH_DEVICE": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads((tmp_path / "micro.json").read_text())
    groups = {b["group"] for b in doc["benchmarks"]}
    assert {"fwd dense T=256 fp32 cpu", "fwd pooled2 T=256 fp32 cpu", "fwd sparse90 T=256 fp32 cpu"} <= groups
    assert all(b["extra_info"]["flops"] > 0 for b in doc["benchmarks"])


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------
def test_quick_preset_has_the_cpu_backend_rows():
    """fp32, B=1, H=8, D=64, T=1k and 2k, fwd and fwd+bwd: dense and causal attention, pooled stride 2, sparse
    at 50 and 90 % of 64x64 blocks cut; dense fp16 and bf16 rows; effattn and effattn-cpp beside torch SDPA."""
    cases = expand(PRESETS["quick"], "cpu")
    assert len(cases) == len(set(cases))
    shape = dict(batch=1, heads_q=8, heads_kv=8, headdim=64, device="cpu")
    wanted = [Case(seqlen_q=t, seqlen_k=t, dtype="fp32", mode=m, **shape, **variant)
              for t in (1024, 2048) for m in ("fwd", "fwd+bwd")
              for variant in (dict(causal=False), dict(causal=True), dict(causal=False, op="pooled", stride=2),
                              *(dict(causal=False, op="sparse", pattern="random", sparsity=s, block=64)
                                for s in (0.5, 0.9)))]
    wanted += [Case(seqlen_q=1024, seqlen_k=1024, dtype=dt, mode="fwd", causal=False, **shape)
               for dt in ("fp16", "bf16")]
    missing = [c.label() for c in wanted if c not in cases]
    assert not missing, missing
    assert {c.dtype for c in cases} == {"fp32", "fp16", "bf16"}
    assert len([c for c in cases if c.dtype != "fp32"]) == 2  # one row each
    for case in wanted:
        for name in ("effattn", "effattn-cpp", "sdpa"):
            assert case.op in PROVIDERS[name].ops, (name, case.label())
        assert PROVIDERS["sdpa"].not_supported_reasons(case) == []
        assert PROVIDERS["effattn"].not_supported_reasons(case) == []


def test_overrides_reach_every_part_and_ops_select_parts():
    quick = PRESETS["quick"]
    assert quick.parts
    seqlen = quick.replace(seqlens=(128,))
    assert {c.seqlen_k for c in expand(seqlen, "cpu")} == {128}  # decode cases have Tq = 1
    sparse = expand(quick.replace(ops=("sparse",)), "cpu")
    assert {c.op for c in sparse} == {"sparse"}
    assert {c.pattern for c in sparse} == {"random", "documents"}  # the main sweep's and a part's
    funnel = expand(quick.replace(ops=("funnel",)), "cpu")
    assert {c.op for c in funnel} == {"funnel"} and {c.dtype for c in funnel} == {"fp32"}
    # the whole model is a part's op only (the base size at T=1k); --op gives it to the main sweep too
    model = {(c.heads_q * c.headdim, c.seqlen_q) for c in expand(quick, "cpu") if c.op == "funnel-model"}
    assert model == {(768, 1024)}
    assert (768, 1024) in {(c.heads_q * c.headdim, c.seqlen_q) for c in expand(quick.replace(ops=("funnel-model",)),
                                                                                 "cpu")}


def test_min_run_time_replaces_the_presets(tmp_path):
    args = bench_attention.build_parser().parse_args(["--preset", "tiny", "--min-run-time", "0.5"])
    sweep = bench_attention.resolve_sweep(args)
    assert sweep.timing.cpu_min_run_time_s == 0.5
    assert sweep.timing.cuda_rep_ms == PRESETS["tiny"].timing.cuda_rep_ms


def test_help_shows_the_presets(capsys):
    """The presets' descriptions hold "%": argparse must get them as "%%"."""
    assert any("%" in sweep.description for sweep in PRESETS.values())
    with pytest.raises(SystemExit) as exc:
        bench_attention.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "50 and 90 % of the 64x64 blocks" in " ".join(out.split())


def test_list_presets_and_providers(capsys):
    assert bench_attention.main(["--device", "cpu", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "presets:" in listing and all(name in listing for name in PRESETS)
    assert all(f"  {name} " in listing for name in PROVIDERS)
