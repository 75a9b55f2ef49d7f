"""The harness's block-sparse sweep (``--preset sparse``): the masks (``BlockMask.random`` and the structured
ones), each mask's build time, the rows against dense attention, the time-against-kept-share plot; and the
deprecated ``python -m bench.bench_sparse``, which runs it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bench import bench_attention, bench_sparse, report
from bench.cases import PATTERNS, PRESETS, Case, expand
from bench.ops import N_DOCUMENTS, _documents, mask_builder, sparse_mask
from bench.runner import STATUS_OK, Row
from effattn import BlockMask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASE = Case(batch=2, heads_q=3, heads_kv=3, seqlen_q=256, seqlen_k=256, headdim=16, dtype="fp32", causal=False,
            mode="fwd", device="cpu", op="sparse", pattern="random", sparsity=0.75, block=32)


def test_random_mask_is_blockmask_random_per_row_with_the_diagonal():
    mask = sparse_mask(CASE)
    expected = BlockMask.random(256, 256, 0.25, 32, heads=3, per_row=True, keep_diagonal=True,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask.block_kinds(), expected.block_kinds())
    kept = mask.block_kinds() > 0
    assert kept.shape == (1, 3, 8, 8)  # one draw per head, shared over the batch
    assert (kept.sum(-1) == 2).all()  # round(0.25 * 8) kv blocks in every query-block row
    assert kept[0, :, torch.arange(8), torch.arange(8)].all()  # the diagonal's block among them
    assert torch.equal(mask_builder(CASE)().block_kinds(), mask.block_kinds())  # the builder is deterministic
    sparser = sparse_mask(dataclasses.replace(CASE, sparsity=0.99))
    assert ((sparser.block_kinds() > 0).sum(-1) == 1).all()  # at least one block per row


@pytest.mark.parametrize("pattern", PATTERNS[1:])
def test_structured_masks(pattern):
    case = dataclasses.replace(CASE, pattern=pattern, sparsity=0.0)
    dense = sparse_mask(case).to_dense()
    assert dense.shape[-2:] == (256, 256) and dense.any(-1).all()  # every query sees some key
    if pattern in ("causal", "sliding"):
        assert not dense.triu(1).any()  # no key after the query
    if pattern == "sliding":
        assert not dense.tril(-256 // 8 - 1).any()  # nor further back than the window
    if pattern == "documents":
        segments = _documents(2, 256, torch.Generator().manual_seed(0))
        assert torch.equal(dense[:, 0], segments[:, :, None] == segments[:, None, :])  # block-diagonal by document
        assert all(len(seg.unique()) == N_DOCUMENTS for seg in segments)


def test_sparse_preset_sweeps_density_next_to_dense():
    cases = expand(PRESETS["sparse"], "cpu")
    sparse = [c for c in cases if c.op == "sparse"]
    assert {c.pattern for c in sparse} == set(PATTERNS)
    kept = sorted({1 - c.sparsity for c in sparse if c.pattern == "random"})
    assert kept == pytest.approx([0.05, 0.1, 0.25, 0.5, 1])
    dense = {(c.seqlen_q, c.mode) for c in cases if c.op == "attention"}
    assert all(not c.causal for c in cases if c.op == "attention")
    assert {(c.seqlen_q, c.mode) for c in sparse} == dense  # a dense row beside every sparse size


def test_sweep_rows_against_dense_with_build_times(tmp_path):
    rc = bench_attention.main(["--preset", "sparse", "--device", "cpu", "--seqlen", "128", "--headdim", "16",
                               "--block", "32", "--sparsity", "0", "0.75", "--pattern", "random", "causal",
                               "--mode", "fwd", "--providers", "sdpa", "effattn", "--min-run-time", "0.002",
                               "--no-ceilings", "--no-plots", "--quiet", "--stem", "sparse", "--out", str(tmp_path)])
    assert rc == 0
    rows = [Row(**r) for r in json.loads((tmp_path / "sparse.json").read_text())["rows"]]
    sparse = [r for r in rows if r.op == "sparse"]
    assert all(r.status == STATUS_OK for r in rows), [(r.provider, r.reason) for r in rows if r.status != STATUS_OK]
    assert sorted({r.kept for r in sparse}) == [0.25, pytest.approx(10 / 16), 1.0]  # 1 of 4 blocks; causal; all
    assert all(r.mask_ms > 0 for r in sparse) and all(r.mask_ms is None for r in rows if r.op == "attention")
    assert len({r.mask_ms for r in sparse if r.pattern == "causal"}) == 1  # once per problem, for every provider

    lines = report.sparse_lines(rows)
    assert len(lines) == len(sparse)
    dense = {r.provider: r.ms for r in rows if r.op == "attention"}
    for line, r in zip(lines, sparse):
        assert line[0] == r.provider and line[10] == report._sig(dense[r.provider])
        assert line[11] == f"{report._sig(dense[r.provider] / r.ms)}x"
        assert line[13] == f"{r.mask_ms / r.ms:.1%}"
    section = (tmp_path / "sparse.md").read_text().split("## Sparse: against dense attention, and the mask's build")
    assert len(section) == 2 and section[1].count("| sparse random 0.75 b32 |") == 2

    pytest.importorskip("matplotlib")
    path = report.write_sparse_plot(tmp_path, rows, "sparse")
    assert path.name == "sparse_sparse.png" and path.read_bytes().startswith(PNG_MAGIC)


def test_no_sparse_rows_no_section():
    assert report.format_sparse_markdown([]) == ""


# ----------------------------------------------------------------------------------------------
# the deprecated command
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old, new", [
    (["--preset", "cpu"], ["--preset", "sparse"]),
    (["--preset", "h100", "--device", "cuda"], ["--preset", "h100-sparse", "--device", "cuda"]),
    (["--device", "cpu", "--fractions", "1", "0.25", "0.1"], ["--preset", "sparse", "--device", "cpu",
                                                             "--sparsity", "0", "0.75", "0.9"]),
    (["--device", "cpu", "--parts", "build", "--block", "32", "32", "--min-run-time", "0.5"],
     ["--preset", "sparse", "--device", "cpu", "--op", "sparse", "--block", "32", "--min-run-time", "0.5"]),
    (["--preset", "tiny", "--parts", "density", "build"], ["--preset", "sparse", "--seqlen", "256", "--headdim", "32",
                                                           "--sparsity", "0", "0.75"]),
])
def test_old_options_become_the_harness_arguments(old, new, tmp_path):
    argv = bench_sparse.harness_argv([*old, "--out", str(tmp_path)])
    expected = [*new, "--stem", "sparse", "--out", str(tmp_path)]
    assert sorted(argv) == sorted(expected) and argv[:2] == expected[:2]
    parsed = bench_attention.build_parser().parse_args(argv)  # the harness accepts them
    assert parsed.stem == "sparse"


@pytest.mark.parametrize("args", [["--parts", "nope"], ["--preset", "nope"], ["--fractions", "0"],
                                  ["--fractions", "1.5"], ["--fractions", "half"], ["--device", "tpu"],
                                  ["--block", "32", "64"], ["--block", "64"]])
def test_old_command_bad_arguments(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        bench_sparse.main(["--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_kept_share_of_a_random_case():
    """round((1 - sparsity) * nKb) of the kv blocks per row, whatever the batch."""
    for sparsity in (0.0, 0.5, 0.9):
        case = dataclasses.replace(CASE, sparsity=sparsity)
        kept = (sparse_mask(case).block_kinds() > 0).double().mean().item()
        assert kept == max(1, round((1 - sparsity) * 8)) / 8 and math.isfinite(kept)
