"""How the driver turns its ranks' failures into the exit code the controller reads."""

from __future__ import annotations

from ray.exceptions import ActorDiedError, RayTaskError

from orchestrator import exit_codes
from orchestrator.config import ConfigError
from orchestrator.runtime.driver import exit_code_for


def _raised(cause: Exception) -> RayTaskError:
    return RayTaskError("RankActor.run", "Traceback ...", cause)


def test_a_dead_rank_process_is_a_fault_whatever_the_others_raised():
    peer_broke = _raised(RuntimeError("Connection closed by peer"))
    assert exit_code_for([peer_broke, ActorDiedError()]) == exit_codes.RANK_LOST
    assert exit_code_for([ActorDiedError()]) == exit_codes.RANK_LOST


def test_a_bad_config_exits_2_and_any_other_exception_1():
    assert exit_code_for([_raised(ConfigError("trainer.max_steps", "must be >= 1"))]) == 2
    assert exit_code_for([_raised(ValueError("a bug in the recipe"))]) == 1
