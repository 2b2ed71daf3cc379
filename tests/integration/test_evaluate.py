"""``python -m titan_cp.cli.evaluate``: perplexity on held-out text, one rank and CP 2.

Reference: the same packed rows (TorchTitan's packing of the shipped held-out
documents), each cut at its document starts and every piece run through the
model *alone* (no packing, no document masking, no CP), cross-entropies
summed. The 1-rank evaluation and a 2-rank CP evaluation (zigzag layout,
documents crossing the shard boundary) must give the same loss.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titan_cp.components.data import TOKENIZER_PATH, VALIDATION_PATH
from titan_cp.cli.evaluate import evaluate_rows, packed_rows
from titan_cp.models.gdn.hf_folder import save_dcp
from titan_cp.models.gdn import GDNModel, model_config

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, ROWS = 128, 3


def _pieces(positions: torch.Tensor) -> list[tuple[int, int]]:
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [positions.numel()]))


def test_evaluate_one_rank_and_cp2_equal_documents_alone(tmp_path):
    torch.manual_seed(0)
    model = GDNModel(model_config("debug_hybrid"))
    model.init_states()
    model.eval()
    save_dcp(model, tmp_path / "checkpoint" / "step-1")
    rows = list(packed_rows(str(VALIDATION_PATH), HuggingFaceTokenizer(tokenizer_path=str(TOKENIZER_PATH)),
                            SEQ_LEN, ROWS))
    assert len(rows) == ROWS and sum(len(_pieces(p)) for _, p, _ in rows) > ROWS  # documents inside rows

    nll, n = 0.0, 0
    with torch.no_grad():
        for tokens, positions, labels in rows:
            for s, e in _pieces(positions):
                logits = model(tokens[None, s:e])[0]
                nll += F.cross_entropy(logits, labels[s:e], reduction="sum").item()
                n += e - s
    reference = nll / n
    one_rank_sum, one_rank_n = evaluate_rows(model, rows, batch_size=2)
    assert one_rank_n == n == ROWS * SEQ_LEN
    assert abs(one_rank_sum / one_rank_n - reference) <= 1e-6 * reference

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "titan_cp.cli.evaluate",
         "--checkpoint", str(tmp_path / "checkpoint"), "--flavor", "debug_hybrid", "--seq_len", str(SEQ_LEN),
         "--max_rows", str(ROWS), "--cp_layout", "zigzag", "--json", str(tmp_path / "cp2.json")],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout
    cp2 = json.loads((tmp_path / "cp2.json").read_text())
    print(f"documents alone {reference:.7f}, one rank {one_rank_sum / one_rank_n:.7f}, CP 2 {cp2['loss']:.7f}")
    assert cp2["tokens"] == n and cp2["cp"] == 2
    assert abs(cp2["loss"] - reference) <= 1e-6 * reference
