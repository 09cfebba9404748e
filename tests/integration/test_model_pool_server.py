"""``bray.ModelPool`` on a real TorchServe: sampled opponents are served clones answering with their step.

StepProbe models answer ``step * (sum(x) + 1)`` for weights ``probe_weights(step)``; here
checkpoint step ``s`` holds ``probe_weights(s + 1)``, so an answer says which step served it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import bray
from bray.torchserve.launcher import TorchServeProcess
from tests.integration.test_remote_model import expected, init_for, probe_net, unregister_all
from tests.models import probe_weights

X = np.ones((2, 4), np.float32)


def test_sample_serves_the_sampled_step_and_a_pool_clone_serves_what_it_was_given(
        torchserve: TorchServeProcess, tmp_path: Path) -> None:
    init_for(torchserve, tmp_path / "store")
    made: list[bray.RemoteModel] = []
    try:
        rm = bray.RemoteModel("pool_learner", model=probe_net(1), forward_args=(X,), num_workers=1, checkpoint_interval=1)
        made.append(rm)
        rm.publish_weights(probe_weights(2)).wait(timeout_s=30)  # step 1
        league = bray.ModelPool(rm, explore_rate=1.0, seed=0, refresh_s=0)
        assert league.candidates() == {"pool_learner-clone-step-0": 0, "pool_learner-clone-step-1": 1}
        seen = set()
        for _ in range(30):
            opp = league.sample()
            out, step = opp(X, return_step=True)
            assert step == league.candidates()[opp.name], opp.name  # the clone serves exactly its checkpoint step
            np.testing.assert_allclose(out, expected(step + 1), err_msg=opp.name)
            league.record(opp, 1.0 if step == 0 else 0.5)
            seen.add(opp.name)
            if len(seen) == 2:
                break
        assert seen == {"pool_learner-clone-step-0", "pool_learner-clone-step-1"}
        made += list(league._clones.values())
        np.testing.assert_allclose(rm(X), expected(2))  # the learner is untouched

        before = sum(g for _, g in league.stats().values())
        slot = rm.clone(0, name="slot")
        made.append(slot)
        fixed = bray.ModelPool(rm, pool=[slot], explore_rate=1.0, seed=1, refresh_s=0)
        for _ in range(4):
            opp = fixed.sample()
            assert opp is slot
            step = fixed.candidates()[fixed._assigned[slot.name]]
            np.testing.assert_allclose(opp(X), expected(step + 1))  # republished and served on its worker
            fixed.record(opp, 1.0)
        assert sum(g for _, g in fixed.stats().values()) == before + 4  # shared through the store
        assert sum(g for _, g in league.stats().values()) == before + 4
    finally:
        for m in made:
            m.close()
        unregister_all(torchserve, {m.name for m in made})
