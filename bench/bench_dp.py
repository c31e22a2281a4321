"""dp/ benchmark: accounting latency, budget spends, noise samplers, DP-SGD vs plain training.

    python -m bench.bench_dp [--write] [--full]

Accounting: wall time of ``dp.compute_epsilon`` after 1, 100 and 10,000 rounds for q = 1 and
q = 0.01 (cold cache), beside dp_accounting's PLD accountant called directly on the same
events (``--full`` adds the direct PLD at q = 1, T = 10,000, which takes minutes). DP-SGD: ms
per step of Opacus per-sample clipping + noise (hooks and functorch modes) vs a plain SGD step
on the same Poisson batches, MLP 64-32-10 on digits, one thread. Writes markdown to stdout and,
with --write, to bench/results/dp.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dp_accounting
import torch
from dp_accounting.pld import pld_privacy_accountant
from sklearn.datasets import load_digits
from torch import nn

import dp
from dp import accounting

DELTA = 1e-5
Z = 1.0


NOTES = """### Reading these numbers

- q = 1: `dp` composes T unsubsampled Gaussians exactly into one (mu = sqrt(T)/z) and solves the
  exact hockey-stick divergence (dp_accounting's `GaussianPrivacyLoss`) for epsilon, so the time
  does not grow with T; dp_accounting's PLD accountant used directly grows with epsilon (its
  grid covers the whole privacy-loss range at 1e-4 spacing). Both agree to < 2e-4 relative.
- q = 0.01: cost is building the single-release PLD of the subsampled Gaussian (cached per
  (z, q) in-process) plus `self_compose(T)`; results are cached per grouped event multiset,
  so peers with identical histories pay once ("cached" column).
- Budget.spend at q < 1 recomputes one PLD composition per new total count (the first spend
  also builds the base PLD); `check` then `spend` of the same event costs one composition.
- DP-SGD: `hooks` (default) is the faster Opacus mode for this MLP; `functorch` is kept as an
  option. Accuracies are on the training set, for a sanity check only.
"""


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def _clear_caches() -> None:
    accounting._grouped_epsilon.cache_clear()
    accounting._gaussian_pld.cache_clear()


def direct_pld(z: float, rounds: int, q: float) -> float:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(DELTA))


def bench_accounting(full: bool) -> list[str]:
    lines = [
        f"| q | rounds | epsilon (z={Z}, delta={DELTA:g}) | dp.compute_epsilon cold | "
        "cached | direct PLD | direct eps |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in (1.0, 0.01):
        for rounds in (1, 100, 10_000):
            _clear_caches()
            kwargs = {"noise_multiplier": Z, "rounds": rounds, "delta": DELTA, "sample_rate": q}
            cold, eps = timed(dp.compute_epsilon, **kwargs)
            warm, _ = timed(dp.compute_epsilon, **kwargs)
            if q == 1.0 and rounds == 10_000 and not full:
                direct = "skipped (--full; ~130 s once measured)"
            else:
                t, value = timed(direct_pld, Z, rounds, q)
                direct = f"{t * 1e3:.0f} ms | {value:.4f}"
            if "|" not in direct:
                direct += " | -"
            lines.append(
                f"| {q:g} | {rounds:,} | {eps:.4f} | {cold * 1e3:.1f} ms | "
                f"{warm * 1e6:.0f} µs | {direct} |"
            )
    return lines


def bench_budget() -> list[str]:
    lines = ["| events per spend | spends | total | per spend |", "|---|---|---|---|"]
    for q, label in ((1.0, "z=1, q=1"), (0.01, "z=1, q=0.01, 10 local steps")):
        _clear_caches()
        budget = dp.Budget(1e9, DELTA)
        count = 1 if q == 1.0 else 10
        spends = 50
        start = time.perf_counter()
        for _ in range(spends):
            budget.spend(noise_multiplier=Z, sample_rate=q, count=count)
        t = time.perf_counter() - start
        lines.append(f"| {label} | {spends} | {t:.2f} s | {t / spends * 1e3:.1f} ms |")
    return lines


def bench_calibration() -> list[str]:
    lines = ["| target | rounds | q | z | time |", "|---|---|---|---|---|"]
    for eps, rounds, q in ((8.0, 30, 1.0), (8.0, 3000, 0.01), (1.0, 100, 0.01)):
        _clear_caches()
        t, z = timed(dp.calibrate_noise, epsilon=eps, delta=DELTA, rounds=rounds, sample_rate=q)
        lines.append(f"| eps={eps:g} | {rounds} | {q:g} | {z:.4f} | {t:.2f} s |")
    return lines


def bench_samplers() -> list[str]:
    n = 100_000
    lines = ["| sampler | n | time | per sample |", "|---|---|---|---|"]
    gen = dp.seeded_generator(0)
    t, _ = timed(dp.gaussian_noise, (n,), 1.0, generator=gen)
    lines.append(
        f"| torch Gaussian (seeded generator) | {n:,} | {t * 1e3:.1f} ms | {t / n * 1e9:.0f} ns |"
    )
    for sigma2, label in ((1, "1"), (10_000, "10^4"), (2**32, "2^32")):
        for rng, name in (
            (random.Random(0), "random.Random"),
            (dp.system_random(), "SystemRandom"),
        ):
            t, _ = timed(dp.sample_discrete_gaussian, sigma2, n, rng=rng)
            lines.append(
                f"| exact discrete Gaussian sigma^2={label}, {name} | {n:,} | {t * 1e3:.0f} ms | "
                f"{t / n * 1e6:.1f} µs |"
            )
    return lines


def bench_dpsgd(steps: int, repeats: int) -> list[str]:
    torch.set_num_threads(1)
    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np)
    n = x.shape[0]
    q = 64 / n
    loss_fn = nn.functional.cross_entropy

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def plain() -> nn.Module:
        m = model()
        g = dp.seeded_generator(1)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(steps):
            chosen = torch.nonzero(torch.rand(n, generator=g) < q).squeeze(1)
            opt.zero_grad()
            loss_fn(m(x[chosen]), y[chosen]).backward()  # type: ignore[no-untyped-call]
            opt.step()
        return m

    def private(mode: str) -> Callable[[], nn.Module]:
        def run() -> nn.Module:
            m = model()
            dp.dp_sgd_train(
                m,
                x,
                y,
                loss_fn=loss_fn,
                lr=0.5,
                steps=steps,
                sample_rate=q,
                clip_norm=1.0,
                noise_multiplier=1.0,
                generator=dp.seeded_generator(1),
                grad_sample_mode=mode,  # type: ignore[arg-type]
            )
            return m

        return run

    variants: dict[str, Callable[[], nn.Module]] = {
        "plain SGD": plain,
        "DP-SGD, Opacus hooks": private("hooks"),
        "DP-SGD, Opacus functorch": private("functorch"),
    }
    for fn in variants.values():  # warm-up: imports, allocator, first-call dispatch
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    accuracy: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, so load on the machine hits all variants alike
        for name, fn in variants.items():
            t, m = timed(fn)
            times[name].append(t)
            assert isinstance(m, nn.Module)
            with torch.no_grad():
                accuracy[name] = float((m(x).argmax(1) == y).float().mean())
    calls, local_steps = 40, 5
    per_call: dict[str, float] = {}
    for name, mode in (("plain SGD", None), ("DP-SGD, Opacus hooks", "hooks")):
        m = model()
        g = dp.seeded_generator(2)
        start = time.perf_counter()
        for _ in range(calls):
            if mode is None:
                opt = torch.optim.SGD(m.parameters(), lr=0.5)
                for _ in range(local_steps):
                    chosen = torch.nonzero(torch.rand(n, generator=g) < q).squeeze(1)
                    opt.zero_grad()
                    loss_fn(m(x[chosen]), y[chosen]).backward()  # type: ignore[no-untyped-call]
                    opt.step()
            else:
                dp.dp_sgd_train(
                    m,
                    x,
                    y,
                    loss_fn=loss_fn,
                    lr=0.5,
                    steps=local_steps,
                    sample_rate=q,
                    clip_norm=1.0,
                    noise_multiplier=1.0,
                    generator=g,
                )
        per_call[name] = (time.perf_counter() - start) / calls
    base = statistics.median(times["plain SGD"]) / steps
    eps = dp.compute_epsilon(noise_multiplier=1.0, rounds=steps, delta=DELTA, sample_rate=q)
    lines = [
        f"{steps} steps, expected batch 64 (q={q:.4f}), clip 1.0, z=1.0 (eps={eps:.2f} at "
        f"delta={DELTA:g}), median of {repeats}:",
        "",
        "| variant | ms/step | x plain | train accuracy |",
        "|---|---|---|---|",
    ]
    for name, ts in times.items():
        per = statistics.median(ts) / steps
        lines.append(f"| {name} | {per * 1e3:.2f} | {per / base:.1f}x | {accuracy[name]:.3f} |")
    ratio = per_call["DP-SGD, Opacus hooks"] / per_call["plain SGD"]
    lines += [
        "",
        f"One learner round = one call with {local_steps} local steps ({calls} calls; includes "
        "Opacus wrap/validate/unwrap per call): plain "
        f"{per_call['plain SGD'] * 1e3:.1f} ms, DP-SGD hooks "
        f"{per_call['DP-SGD, Opacus hooks'] * 1e3:.1f} ms ({ratio:.1f}x).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write bench/results/dp.md")
    parser.add_argument("--full", action="store_true", help="also the slow direct PLD case")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    command = (
        "python -m bench.bench_dp"
        + (" --write" if args.write else "")
        + (" --full" if args.full else "")
    )
    out = [
        "## dp: accounting, budget, noise, DP-SGD",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {platform.python_version()}, "
        f"torch {torch.__version__}, shared 2-core box (other engineers' jobs were running).",
        "",
        "### Time to report epsilon (compute_epsilon)",
        "",
        *bench_accounting(args.full),
        "",
        "### Budget.spend (check + compose + record, in memory)",
        "",
        *bench_budget(),
        "",
        "### Calibration (calibrate_noise, cold cache)",
        "",
        *bench_calibration(),
        "",
        "### Noise samplers",
        "",
        *bench_samplers(),
        "",
        "### DP-SGD (Opacus per-sample gradients) vs plain SGD, MLP 64-32-10 on digits",
        "",
        *bench_dpsgd(args.steps, args.repeats),
        "",
        NOTES,
    ]
    text = "\n".join(out)
    print(text)
    if args.write:
        path = Path(__file__).parent / "results" / "dp.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()
