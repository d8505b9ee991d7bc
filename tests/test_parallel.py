"""Vocabulary-parallel cross_entropy and linear_cross_entropy (``process_group=``, DTensor) on real
gloo process groups: 2 and 3 ranks on loopback, slices of unequal sizes (one of them empty),
against float64 references on the whole logits. The ranks' work is in parallel_workers.py; each
world size is spawned once (a module fixture) and every test reads its suite's failures."""

from __future__ import annotations

import parallel_workers as pw
import pytest
import torch.distributed as dist
from conftest import BACKENDS

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
]

# (world, class slice sizes): unequal slices; with 3 ranks the middle one holds no class
WORLDS = {2: (9, 14), 3: (5, 0, 18)}
SUITES = tuple(pw.SUITES)


@pytest.fixture(
    scope="module",
    params=[(w, b) for w in sorted(WORLDS) for b in BACKENDS],
    ids=lambda p: f"{p[0]}ranks-{p[1]}",
)
def ranks(request):
    """Every suite's failures per rank, from one spawn of ``world`` ranks on ``backend``."""
    world, backend = request.param
    return pw.launch(world, WORLDS[world], SUITES, backend, timeout_s=600)


def _check(results, suite):
    failures = [f"rank {r}: {msg}" for r, msgs in enumerate(results[suite]) for msg in msgs]
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:12])


def test_every_option_matches_the_whole_logits(ranks):
    _check(ranks, "options")


def test_hostile_values_float32_and_soft_target_gradients(ranks):
    _check(ranks, "hostile")


def test_two_all_reduces_forward_none_backward(ranks):
    _check(ranks, "collectives")


def test_bad_arguments_raise_the_same_error_on_every_rank(ranks):
    _check(ranks, "errors")


def test_dtensor_matches_loss_parallel(ranks):
    _check(ranks, "dtensor")


def test_linear_cross_entropy_sharded_weight(ranks):
    _check(ranks, "linear")


def test_a_hung_rank_fails_within_the_deadline():
    """The launcher's own guard: ranks that never finish are killed and reported."""
    with pytest.raises(TimeoutError):
        pw.launch(2, (3, 4), ("sleep",), BACKENDS[0], timeout_s=8)


def test_a_dead_rank_is_reported_with_its_stack(capfd):
    """A rank killed by a signal: the launcher says which rank and signal, and faulthandler has
    printed the dead rank's Python stack (CI's logs then show where a crash happened)."""
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 died .*SIGABRT"):
        pw.launch(2, (3, 4), ("abort",), BACKENDS[0], timeout_s=120)
    err = capfd.readouterr().err
    assert "Fatal Python error: Aborted" in err and "suite_abort" in err
