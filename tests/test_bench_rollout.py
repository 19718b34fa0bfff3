"""VecEnv.step_async + step_wait (used by benchmarks/bench_rollout.py's pipelined rollout) must
give what step gives through a worker process, and must refuse a call between the two.

One worker holding both envs: a second worker doubled the test's time (~25 s on 2 busy cores),
and replies from several workers are gathered by the code call() shares, which
test_envs.py's test_vec_env_interface_with_worker_processes runs with 2 workers."""

import numpy as np
import pytest

import envs as E

SIZE, STEPS, IDS = 48, 3, [5, 11]


def test_step_async_then_wait_matches_step_through_a_worker():
    actions = np.random.default_rng(0).uniform(-1, 1, (STEPS, len(IDS), 7)).astype(np.float32)
    with E.make_vec_env("ind", num_envs=len(IDS), image_size=SIZE, num_workers=1) as envs:
        envs.reset(IDS)
        stepped = [envs.step(a) for a in actions]
        envs.reset(IDS)
        pipelined = []
        for a in actions:
            envs.step_async(a)
            a[:] = 0  # the actions were sent: reusing the array must not change this step
            pipelined.append(envs.step_wait())
        for (obs, reward, done, info), (obs2, reward2, done2, info2) in zip(
                stepped, pipelined, strict=True):
            np.testing.assert_array_equal(obs["image"], obs2["image"])
            assert obs["instruction"] == obs2["instruction"]
            np.testing.assert_array_equal(reward, reward2)
            np.testing.assert_array_equal(done, done2)
            for key in info:
                np.testing.assert_array_equal(info[key], info2[key])
        envs.step_async(actions[0])
        with pytest.raises(RuntimeError, match="step_wait"):
            envs.reset(IDS)  # would read the step's replies: refused, the pipes stay in sync
        envs.step_wait()
        with pytest.raises(RuntimeError, match="without step_async"):
            envs.step_wait()
        assert envs.reset(IDS)["image"].shape == (len(IDS), SIZE, SIZE, 3)
