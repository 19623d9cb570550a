"""The isolated cluster's mount plan and the fallback where namespaces are refused: pure."""

from __future__ import annotations

import pytest

from orchestrator.fleet.isolation import isolation_decision, mount_plan


def steps(plan: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(s["op"], s["path"]) for s in plan]


def test_kept_dirs_inside_a_hidden_one_are_held_first_and_bound_back_after_the_tmpfs():
    plan = mount_plan(
        hide=["/sw", "/src/orchestrator", "/src/recipes"],
        keep=["/sw/ray/partner", "/sw/fleet/local/partner"],
    )
    assert steps(plan) == [
        ("hold", "/sw/ray/partner"),
        ("hold", "/sw/fleet/local/partner"),
        ("tmpfs", "/sw"),
        ("tmpfs", "/src/orchestrator"),
        ("tmpfs", "/src/recipes"),
        ("bind", "/sw/ray/partner"),
        ("bind", "/sw/fleet/local/partner"),
        ("seal", "/sw"),
        ("seal", "/src/orchestrator"),
        ("seal", "/src/recipes"),
    ]


def test_a_hidden_dir_inside_a_hidden_one_needs_no_mount_of_its_own():
    plan = mount_plan(hide=["/sw/storage/home", "/sw"], keep=[])
    assert steps(plan) == [("tmpfs", "/sw"), ("seal", "/sw")]


def test_a_kept_dir_nothing_hides_needs_no_step():
    # The venv stays visible by itself; the package installed in it is hidden.
    plan = mount_plan(hide=["/venv/site-packages/orchestrator"], keep=["/venv", "/usr"])
    assert steps(plan) == [
        ("tmpfs", "/venv/site-packages/orchestrator"),
        ("seal", "/venv/site-packages/orchestrator"),
    ]


def test_a_hidden_dir_inside_a_kept_one_inside_a_hidden_one_is_hidden_after_the_bind():
    plan = mount_plan(hide=["/sw", "/sw/keep/secret"], keep=["/sw/keep"])
    assert steps(plan) == [
        ("hold", "/sw/keep"),
        ("tmpfs", "/sw"),
        ("bind", "/sw/keep"),
        ("tmpfs", "/sw/keep/secret"),
        ("seal", "/sw"),
        ("seal", "/sw/keep/secret"),
    ]


def test_a_sibling_with_a_common_prefix_is_not_inside():
    plan = mount_plan(hide=["/sw"], keep=["/sw-other/ray"])
    assert steps(plan) == [("tmpfs", "/sw"), ("seal", "/sw")]


@pytest.mark.parametrize(
    ("hide", "keep", "message"),
    [
        (["/sw"], ["/sw"], "both hidden and kept"),
        (["relative/dir"], [], "must be absolute"),
        (["/sw/../etc"], [], "must be absolute and resolved"),
        (["/"], [], "whole machine"),
    ],
)
def test_plans_that_cannot_be_carried_out_are_refused(hide, keep, message):
    with pytest.raises(ValueError, match=message):
        mount_plan(hide, keep)


def test_a_cluster_is_isolated_when_asked_and_the_machine_gives_a_namespace():
    assert isolation_decision("partner", True, None) == (True, None)


def test_a_cluster_not_asking_for_isolation_starts_as_it_is_and_says_nothing():
    assert isolation_decision("home", False, "unshare failed: Operation not permitted") == (
        False,
        None,
    )


def test_a_refused_namespace_starts_the_cluster_unisolated_with_one_line_saying_why():
    isolated, line = isolation_decision("partner", True, "unshare failed: Operation not permitted")
    assert not isolated
    assert line.count("\n") == 0
    assert "partner" in line and "Operation not permitted" in line and "unisolated" in line
