"""Robustness in Flower's simulation runtime: 20 simulated devices with non-IID digits,
20% of them send sign-flipped, boosted updates (the simulator's model-poisoning
fault). Robust aggregation stays near the clean run; plain averaging collapses.
All five runs share one simulation (one Ray start) and the same start weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.protos.flower import flower_available

pytest.importorskip("ray", reason="Flower's simulation runtime needs edgefleet[fl-sim]")
if not flower_available():
    pytest.skip("Flower is not installed (edgefleet[fl])", allow_module_level=True)


def test_robust_strategies_resist_poisoning_that_breaks_fedavg(tmp_path: Path) -> None:
    from edgefleet.simulator.fl import FederatedSimulation

    with FederatedSimulation(tmp_path, devices=20, alpha=5.0, seed=0) as sim:
        report = sim.run(
            [
                ("fedavg", "none"),
                ("fedavg", "signflip"),
                ("fedmedian", "signflip"),
                ("fedtrimmedavg", "signflip"),
                ("krum", "signflip"),
            ],
            rounds=3,
            attack_fraction=0.2,
            attack_scale=10.0,
            local_epochs=3,
            lr=5e-3,
        )
    assert len(report.attackers) == 4
    runs = report.runs
    clean = runs["fedavg:none"].final
    assert clean > 0.75, runs["fedavg:none"].accuracy  # federated training does learn
    # every round of every run used the same simulated devices, attackers included
    for run in runs.values():
        assert [len(r["participants"]) for r in run.rounds] == [20, 20, 20]
    for robust in ("fedmedian:signflip", "fedtrimmedavg:signflip", "krum:signflip"):
        assert runs[robust].final >= clean - 0.12, (robust, runs[robust].accuracy, clean)
    poisoned = runs["fedavg:signflip"].final
    assert poisoned < clean / 2, (runs["fedavg:signflip"].accuracy, clean)
