"""Train a CartPole-v1 policy with N-HARPG, N-PG-IGT or NPG (curvopt.optim) in a few lines.

    python examples/cartpole_policy_gradient.py --method nharpg --iterations 60

The three pieces:
1. a policy: an ordinary nn.Module (here a (32, 32) tanh MLP with a softmax over the 2 actions);
2. a sampler: how the optimizer gets estimates; it owns the rollout function and the discount;
3. an optimizer over the policy's parameters whose step(sampler) asks for gradients (and
   Hessian-vector products) at the points it chooses, then moves the parameters (ascent on J).
"""

import argparse

import torch

from curvopt.optim import NHARPG, NPG, NPGIGT
from curvopt.rl import (
    CategoricalMLPPolicy,
    GymRollout,
    LinearFeatureBaseline,
    PolicyGradientSampler,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["nharpg", "npgigt", "npg"], default="nharpg")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny networks: one thread is fastest

    # 1. the policy
    policy = CategoricalMLPPolicy(obs_dim=4, n_actions=2, hidden=(32, 32))

    # 2. the sampler: 10 trajectories of at most H = 100 steps per estimate, discount 0.99
    sampler = PolicyGradientSampler(
        policy,
        rollout=GymRollout("CartPole-v1", horizon=100, seed=args.seed),
        batch_size=10,
        discount=0.99,
        baseline=LinearFeatureBaseline(),
    )

    # 3. the optimizer
    if args.method == "nharpg":
        opt = NHARPG(policy.parameters(), lr=0.3)  # γ_t = 0.3·2/(t+2), η_t = 2/(t+2)
    elif args.method == "npgigt":
        opt = NPGIGT(policy.parameters(), lr=0.3)  # γ_t = 0.3·2/(t+2), η_t = (2/(t+2))^0.8
    else:
        opt = NPG(policy.parameters(), delta=0.02)  # KL trust region, CG on Fisher products

    for it in range(args.iterations):
        opt.step(sampler)
        if it % 10 == 0 or it == args.iterations - 1:
            # the last gradient batch was sampled at the current iterate (N-PG-IGT: extrapolated)
            counts, returns = sampler.returns("gradient")
            n = sampler.num_trajectories
            print(f"iter {it:3d}  trajectories {n:5d}  return {returns[-1]:6.1f}")

    # the optimizer state (θ_{t-1}, d_{t-1}, t) round-trips like any torch.optim state; save
    # {"policy": policy.state_dict(), "optim": checkpoint} with torch.save to resume later
    checkpoint = opt.state_dict()
    opt.load_state_dict(checkpoint)


if __name__ == "__main__":
    main()
