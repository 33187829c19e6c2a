"""Two gloo processes under torchrun: identical weights, cross-rank loss mean, exact resume."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from cfdg.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

# Each rank trains, then saves its own online weights, so the test can compare the ranks.
WORKER = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from cfdg.train import Trainer, TrainConfig

    out, max_steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    trainer = Trainer(TrainConfig(
        data="digits", preset="tiny", out=out, batch_size=16, max_steps=max_steps,
        log_every=2, sample_every=0, checkpoint_every=100, warmup_steps=2, device="cpu",
        precision="fp32", resume=resume,
    ))
    trainer.run()
    save_file(trainer.model.state_dict(), f"{out}/rank{trainer.dist.rank}.safetensors")
    """
)


def torchrun(tmp_path, out, max_steps, resume=False):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(worker), str(out), str(max_steps), str(int(resume))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CFDG_PROGRESS": "0"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_two_ranks_agree_average_and_resume(tmp_path):
    straight = torchrun(tmp_path, tmp_path / "straight", 6)

    # Both ranks hold the same weights, equal to the checkpoint rank 0 wrote.
    rank0 = load_file(straight / "rank0.safetensors")
    assert_same(rank0, load_file(straight / "rank1.safetensors"))
    assert_same(rank0, load_file(latest_checkpoint(straight) / "model.safetensors"))

    # The logged loss is the mean of the two ranks' losses, which differ (own shard, own noise).
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        first, second = record["loss_per_rank"]
        assert first != second
        assert record["loss"] == pytest.approx((first + second) / 2, rel=1e-9)
    assert json.loads((straight / "config.json").read_text())["world_size"] == 2

    # 3 steps, then a two-process resume to 6, equals 6 steps straight.
    halves = torchrun(tmp_path, tmp_path / "halves", 3)
    torchrun(tmp_path, halves, 6, resume=True)
    assert_same(rank0, load_file(halves / "rank1.safetensors"))
    ema = load_file(latest_checkpoint(halves) / "ema.safetensors")
    assert_same(load_file(latest_checkpoint(straight) / "ema.safetensors"), ema)
