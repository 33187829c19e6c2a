"""Shared fixtures: a tiny trained run on scikit-learn's digits, made once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory of the `tiny` preset trained for 20 steps on digits (a few seconds)."""
    from cfdg.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny_run")
    train(
        TrainConfig(
            data="digits",
            preset="tiny",
            out=str(out),
            max_steps=20,
            log_every=10,
            sample_every=0,
            checkpoint_every=20,
            device="cpu",
            seed=0,
        )
    )
    return out
