"""Benchmarks of dt.py: training updates/s with MFU (fp32, --bf16, torch.compile) at the official
config, vectorized vs one-episode-at-a-time evaluation, peak memory. Ratios in one process only.

    python benchmarks/bench.py --only dt --quick       # smoke
    python benchmarks/bench.py --only dt_train         # updates/s, MFU (compile takes minutes)
    python benchmarks/peers/d3rlpy_dt.py --help        # d3rlpy's DT on the same data and CPU

MFU = FLOPs of one update (torch's FlopCounterMode on the eager model) x updates/s, over the
peak of a 1024^3 matmul in the same dtype measured in the same run.
"""
import resource

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import dt
from bench import median_time


def matmul_peak(dtype, n: int = 1024) -> float:
    """FLOP/s of an n^3 matmul in this process (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, repeats=5, warmup=2)


def make_update(data: dt.TrajectoryData, args: dt.Args, device, compiled: bool = False):
    """-> update(): one iteration of dt.main's loop (sample, forward, masked loss, backward,
    clip, AdamW, warmup), on a fresh model seeded 0."""
    torch.manual_seed(0)
    model = dt.make_model(args, data.stats()).to(device).train()
    optimizer, scheduler = dt.make_optimizer(model, args)
    fwd = torch.compile(model) if compiled else model
    gen = torch.Generator(device=device).manual_seed(0)

    def update():
        states, actions, returns, timesteps, mask = data.sample(args.batch_size,
                                                                args.context_len, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = fwd(states, actions, returns, timesteps)
        loss = dt.loss_fn(pred, actions, mask)["total_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), dt.GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return update


def flops_per_update(data, args, device) -> float:
    with FlopCounterMode(display=False) as fc:
        make_update(data, args, device)()
    return fc.get_total_flops()


def dt_train(quick: bool):
    """Updates/s at the official config (batch 64, K=20, d=128, 3 layers) on hopper/medium:
    fp32, --bf16 and torch.compile'd fp32 (not in --quick), each with its MFU."""
    device = common.get_device(True)
    data_np = common.load_dataset("hopper", "medium", verbose=False)
    if quick:
        data_np = {k: v[:20_000] for k, v in data_np.items()}
    data = dt.TrajectoryData(data_np, dt.check_args(dt.Args()), device)
    flops = flops_per_update(data, dt.check_args(dt.Args()), device)
    peaks = {False: matmul_peak(torch.float32), True: matmul_peak(torch.bfloat16)}
    (n, repeats), rows, rate = (2, 1) if quick else (10, 3), [], {}
    settings = [("fp32", False, False), ("bf16 autocast", True, False)]
    settings += [] if quick else [("fp32 torch.compile", False, True)]
    for name, bf16, compiled in settings:
        update = make_update(data, dt.check_args(dt.Args(bf16=bf16)), device, compiled)
        rate[name] = n / median_time(lambda: [update() for _ in range(n)], repeats, warmup=1)
        mfu = flops * rate[name] / peaks[bf16]
        rows.append(dict(row="dt_train", metric=f"updates/s ({name})", value=rate[name],
                         unit="updates/s", setting=f"batch 64, K=20, d=128, 3 layers, {device}, "
                         f"{torch.get_num_threads()} threads",
                         notes=f"{flops / 1e9:.1f} GFLOP/update, MFU {100 * mfu:.0f}% of "
                               f"{peaks[bf16] / 1e9:.0f} GFLOP/s ({'bf16' if bf16 else 'fp32'})"))
    for name in list(rate)[1:]:
        rows.append(dict(row="dt_train", metric=f"{name} / fp32", value=rate[name] / rate["fp32"],
                         unit="x", setting="same process, same data"))
    rows.append(dict(row="dt_train", metric="peak memory",
                     value=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     unit="MiB (peak RSS)", setting="includes the 1M-transition dataset"))
    return rows


def dt_eval(quick: bool):
    """10 halfcheetah episodes (no early ends) with one DT at the default config: all at once
    (one batched forward per step) vs one episode at a time, same policy class."""
    n, steps = (2, 30) if quick else (10, 200)
    device = common.get_device(True)
    rows = []
    for bf16 in (False, True):
        args = dt.check_args(dt.Args(env="halfcheetah", bf16=bf16))
        torch.manual_seed(0)
        model = dt.DecisionTransformer(*common.env_dims("halfcheetah"), args).to(device).eval()
        obs_dim = model.embed_state.in_features
        policy = dt.DTPolicy(model, args, torch.zeros(obs_dim), torch.ones(obs_dim), target=6000.0)

        def run(n_envs, seed):
            return common.evaluate(policy, "halfcheetah", n_episodes=n_envs, seed=seed,
                                   max_steps=steps, progress=False)

        vec = median_time(lambda: run(n, 0), repeats=1 if quick else 2, warmup=1)
        seq = median_time(lambda: [run(1, i) for i in range(n)], repeats=1 if quick else 2,
                          warmup=0)
        prec = "bf16" if bf16 else "fp32"
        setting = f"{n} episodes x {steps} steps, K=20 d=128 3 layers, {prec}, {device}"
        rows += [dict(row="dt_eval", metric=f"vectorized ({prec})", value=n * steps / vec,
                      unit="env steps/s", setting=setting),
                 dict(row="dt_eval", metric=f"one at a time ({prec})", value=n * steps / seq,
                      unit="env steps/s", setting=setting),
                 dict(row="dt_eval", metric=f"speed-up ({prec})", value=seq / vec, unit="x",
                      setting=setting)]
    return rows


ROWS = {"dt_eval": dt_eval, "dt_train": dt_train}
