"""Where workers go: spread, never on a node that stopped answering, only where the resources are."""

from __future__ import annotations

from actors.placement import NodeView, choose_node, exclusion_selector


def n(nid, cpu=2.0, workers=0, coordinator=False, alive=True, answering=True, **res):
    return NodeView(nid, alive, answering, {"CPU": cpu, **res}, workers, coordinator)


def test_spread_prefers_the_node_with_fewest_workers_then_not_the_coordinators():
    assert choose_node([n("a", coordinator=True), n("b")], 0.5) == "b"
    assert choose_node([n("a", coordinator=True), n("b", workers=1)], 0.5) == "a"
    assert choose_node([n("a", workers=1), n("b", workers=1, cpu=3)], 0.5) == "b"  # then the most free CPUs
    assert choose_node([n("b"), n("a")], 0.5) == "a"  # then the id: deterministic


def test_a_node_that_stopped_answering_is_never_chosen_even_if_ray_lists_it_alive():
    nodes = [n("dead", answering=False), n("busy", workers=3)]
    assert choose_node(nodes, 0.5) == "busy"
    assert choose_node([n("dead", answering=False)], 0.5) is None
    assert exclusion_selector(nodes) == {"ray.io/node-id": "!in(dead)"}
    assert exclusion_selector([n("a"), n("gone", alive=False, answering=False)]) is None  # Ray knows that one


def test_only_nodes_with_the_resources_the_worker_asks_for():
    nodes = [n("a", cpu=0.4), n("b", cpu=4), n("c", cpu=4, stream=1)]
    assert choose_node(nodes, 0.5) == "b"
    assert choose_node(nodes, 0.5, {"stream": 1}) == "c"
    assert choose_node(nodes, 8) is None  # nowhere: left to Ray, whose autoscaler sees the demand
