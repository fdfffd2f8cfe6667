"""Sweep analysis: loss-vs-compute power laws per arm, compute multipliers, plots, a Markdown report.

Each arm (the runs sharing one value of the `arm` axis) is fitted with
    L(C) = E + A * (C / C0) ** -alpha         (E: the irreducible loss, C0: a fixed compute scale)
by least squares (scipy). The compute multiplier of an arm over the reference
arm is C_ref(L) / C_arm(L) at the loss the arm reaches with its largest budget:
how many times more compute the reference needs for the same loss (> 1: the arm
is more efficient). Its uncertainty comes from drawing fit parameters from the
fits' covariance. A degenerate fit (three points for three parameters, a parameter
at its bound, no finite covariance) is reported as such, and no interval comes from it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np

from k2jax.train.metrics import read_metrics

C0 = 1e12  # compute scale (FLOPs) that keeps the fit well conditioned
ALPHA_BOUNDS = (1e-3, 3.0)


class AnalysisError(ValueError):
    """There is nothing (or too little) to analyse."""

    exit_code = 2  # of the CLI


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    e: float
    a: float
    alpha: float
    cov: np.ndarray  # (3, 3) covariance of (e, a, alpha); inf where undetermined
    degenerate: str = ""  # why the fit does not estimate anything ("" for a proper fit)

    def loss(self, compute):
        return self.e + self.a * (np.asarray(compute, float) / C0) ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """FLOPs at which the fit reaches `loss` (inf if it never does)."""
        if loss <= self.e:
            return math.inf
        return C0 * (self.a / (loss - self.e)) ** (1 / self.alpha)


def power_law(c, e, a, alpha):
    return e + a * (c / C0) ** -alpha


def fit_power_law(compute, loss) -> PowerLawFit:
    """Least-squares fit of L = E + A (C/C0)^-alpha to three or more (compute, loss) points."""
    from scipy.optimize import OptimizeWarning, curve_fit

    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    if len(compute) < 3:
        raise ValueError(f"a power law with an irreducible term needs >= 3 runs, got {len(compute)}")
    lo = float(loss.min())
    p0 = (0.8 * lo, float(loss.max() - 0.8 * lo) * (compute.min() / C0) ** 0.3, 0.3)
    with warnings.catch_warnings():  # an undetermined covariance is reported as a degenerate fit
        warnings.simplefilter("ignore", OptimizeWarning)
        params, cov = curve_fit(power_law, compute, loss, p0=p0, bounds=([0, 0, ALPHA_BOUNDS[0]], [lo, np.inf,
                                ALPHA_BOUNDS[1]]), maxfev=20000)
    e, a, alpha = map(float, params)
    cov = np.asarray(cov, float)
    reasons = _at_bounds(e, alpha, lo)
    if len(compute) == 3:
        reasons.insert(0, "three points for three parameters")
    if not np.all(np.isfinite(cov)):
        reasons.append("no finite covariance")
    return PowerLawFit(e, a, alpha, cov, "; ".join(reasons))


def _at_bounds(e: float, alpha: float, lowest_loss: float) -> list[str]:
    """The fit parameters that ended at a bound of the fit: the data did not determine them."""
    def near(x: float, bound: float) -> bool:
        return abs(x - bound) <= 1e-3 * max(abs(bound), 1e-3)

    out = []
    if near(e, 0.0) or near(e, lowest_loss):
        out.append(f"E = {e:.3g} at its bound ({'0' if near(e, 0.0) else 'the lowest loss'})")
    if near(alpha, ALPHA_BOUNDS[0]) or near(alpha, ALPHA_BOUNDS[1]):
        out.append(f"alpha = {alpha:.3g} at its bound")
    return out


def fit_shared_multipliers(points: dict[str, list[tuple[float, float]]], reference: str) -> dict:
    """One curve for all arms, each arm's compute rescaled: L = E + A (m_arm C / C0)^-alpha, m_reference = 1.

    Fewer parameters than a fit per arm (3 + arms - 1), so it stays determined with short
    curves; the price is assuming every arm has the same E and alpha. Returns
    arm -> {"value": m, "interval_68": (lo, hi) or None} for every arm but the reference.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    names = [reference, *[n for n in points if n != reference]]
    compute = np.concatenate([[c for c, _ in points[n]] for n in names])
    loss = np.concatenate([[v for _, v in points[n]] for n in names])
    arm = np.concatenate([[i] * len(points[n]) for i, n in enumerate(names)])

    def model(c, e, a, alpha, *log_m):
        m = np.exp(np.concatenate([[0.0], log_m]))[arm]
        return power_law(m * c, e, a, alpha)

    lo = float(loss.min())
    p0 = [0.8 * lo, float(loss.max() - 0.8 * lo) * (compute.min() / C0) ** 0.3, 0.3] + [0.0] * (len(names) - 1)
    bounds = ([0, 0, ALPHA_BOUNDS[0]] + [-5.0] * (len(names) - 1), [lo, np.inf, ALPHA_BOUNDS[1]] + [5.0] * (len(names) - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        params, cov = curve_fit(model, compute, loss, p0=p0, bounds=bounds, maxfev=20000)
    shape = _at_bounds(float(params[0]), float(params[2]), lo)
    if len(compute) <= len(params):
        shape.insert(0, f"{len(compute)} points for {len(params)} parameters")
    out = {}
    for i, name in enumerate(names[1:]):
        log_m, var = params[3 + i], cov[3 + i, 3 + i]
        reasons = shape + ([f"m at its bound e^{log_m:+.0f}"] if abs(abs(log_m) - 5.0) < 5e-3 else [])
        if not (math.isfinite(var) and var >= 0):
            reasons.append("no finite covariance")
        sd = None if reasons else math.sqrt(var)
        out[name] = {"vs": reference, "value": math.exp(log_m), "degenerate": "; ".join(reasons),
                     "interval_68": (math.exp(log_m - sd), math.exp(log_m + sd)) if sd is not None else None}
    return out


def compute_multiplier(reference: PowerLawFit, arm: PowerLawFit, loss: float) -> float:
    return reference.compute_for(loss) / arm.compute_for(loss)


def multiplier_interval(reference: PowerLawFit, arm: PowerLawFit, loss: float, draws: int = 2000,
                        seed: int = 0) -> tuple[float, float] | None:
    """16th-84th percentile of the multiplier over parameter draws; None if either fit is degenerate."""
    if reference.degenerate or arm.degenerate:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for ref_p, arm_p in zip(rng.multivariate_normal([reference.e, reference.a, reference.alpha], reference.cov, draws),
                            rng.multivariate_normal([arm.e, arm.a, arm.alpha], arm.cov, draws)):
        if min(ref_p[1], ref_p[2], arm_p[1], arm_p[2]) <= 0:
            continue
        m = compute_multiplier(PowerLawFit(*ref_p, reference.cov), PowerLawFit(*arm_p, arm.cov), loss)
        if math.isfinite(m):
            values.append(m)
    if len(values) < draws // 2:
        return None
    return float(np.percentile(values, 16)), float(np.percentile(values, 84))


def read_results(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
    return rows


def analyze(sweep_dir: str | Path, *, arm: str | None = None, reference: str | None = None,
            y: str = "final_eval_loss", title: str = "", curves: bool = False, best_over: str | None = None) -> dict:
    """Fit, plot and report a sweep's results.csv into sweep_dir/report/; returns the fitted numbers.

    By default each run is one point (its FLOPs, its `y`). With `curves`, each run adds the
    points of its held-out curve from a quarter of the way in (compute = FLOPs so far): for
    runs with a constant learning rate, where one run per arm is a loss-vs-compute series.
    With `best_over` (an axis such as optim.learning_rate), only the run with the lowest `y`
    among runs that differ in that axis alone is kept: each arm at its tuned value.
    """
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "results.csv").is_file():
        raise AnalysisError(f"{sweep_dir} has no results.csv: run the sweep first")
    every_row = read_results(sweep_dir / "results.csv")
    rows = [r for r in every_row if _finite(r.get(y))]
    if not rows:
        raise AnalysisError(f"{sweep_dir / 'results.csv'} has no finished run with a finite {y}")
    if arm is not None and arm not in rows[0]:
        raise AnalysisError(f"--arm {arm!r} is not a column of results.csv ({', '.join(rows[0])})")
    tuning = []
    if best_over is not None:
        rows, tuning = best_per_setting(every_row, best_over, y)
    missing = [r["run"] for r in rows if not (sweep_dir / r["run"] / "metrics.jsonl").is_file()]
    if curves and missing:
        raise AnalysisError(f"--curves reads each run's metrics.jsonl; {len(missing)} runs have none in {sweep_dir} "
                            f"(e.g. {missing[0]}): analyse without --curves")
    points: dict[str, list[tuple[float, float]]] = {}  # arm -> [(compute, loss)]
    for row in rows:
        name = _arm_name(row[arm]) if arm else "all"
        points.setdefault(name, []).extend(_curve_points(sweep_dir, row) if curves else [(row["flops"], row[y])])
    fits, unfitted = {}, {}
    for name, pts in points.items():
        if len({c for c, _ in pts}) < 3:
            unfitted[name] = f"{len({c for c, _ in pts})} compute points (a fit needs 3)"
            continue
        try:
            fits[name] = fit_power_law(*zip(*pts))
        except RuntimeError as e:  # curve_fit found no minimum: points that do not follow a power law
            unfitted[name] = f"no fit: {e}"
    result = {"arms": {name: {"e": f.e, "a": f.a, "alpha": f.alpha, "degenerate": f.degenerate}
                       for name, f in fits.items()}, "multipliers": {},
              "unfitted": unfitted, "points": "held-out curves" if curves else y, "tuning": tuning}
    reference = _arm_name(reference) if reference is not None else None
    reference = reference if reference in fits else next(iter(fits), None)
    for name, fit in fits.items():
        if name == reference:
            continue
        target = float(fit.loss(max(c for c, _ in points[name])))
        degenerate = "; ".join(f"{n}: {fits[n].degenerate}" for n in (reference, name) if fits[n].degenerate)
        result["multipliers"][name] = {"vs": reference, "at_loss": target,
                                       "value": compute_multiplier(fits[reference], fit, target),
                                       "interval_68": multiplier_interval(fits[reference], fit, target),
                                       "degenerate": degenerate}
    if reference is not None and len(fits) >= 2:
        try:
            result["shared_fit_multipliers"] = fit_shared_multipliers({n: points[n] for n in fits}, reference)
        except RuntimeError as e:
            result["shared_fit_multipliers"] = {"error": str(e)}
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    _plot_fits(points, fits, "held-out loss" if curves else y, out / "loss_vs_compute.png", title)
    with_metrics = [r["run"] for r in rows if r["run"] not in missing]
    if with_metrics:
        _plot_curves(sweep_dir, with_metrics, out / "curves.png", title)
    result["curves_plotted"] = len(with_metrics)
    (out / "fits.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(_markdown(rows, result, y, title or sweep_dir.name))
    return result


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _axis_columns(row: dict) -> list[str]:
    """The sweep's axis columns: results.csv holds run, the axes, then params_total and the results."""
    cols = list(row)
    return cols[1:cols.index("params_total")] if "params_total" in cols else []


def best_per_setting(rows: list[dict], over: str, y: str) -> tuple[list[dict], list[dict]]:
    """(the lowest-`y` row of each group of rows differing only in column `over`, one record per
    group: its other axis values, each tried value's `y` (None: diverged or no result), the best,
    and whether the best is an end of the tried range, where a wider range might do better)."""
    axes = _axis_columns(rows[0])
    if over not in axes:
        raise AnalysisError(f"--best-over {over!r} is not an axis of results.csv ({', '.join(axes)})")
    others = [c for c in axes if c != over]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(_arm_name(row[c]) for c in others), []).append(row)
    best, tuning = [], []
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r[over])
        results = [r for r in group if _finite(r.get(y))]
        if not results:
            continue
        winner = min(results, key=lambda r: r[y])
        best.append(winner)
        tuning.append({"setting": dict(zip(others, key)),
                       "tried": {_arm_name(r[over]): r[y] if _finite(r.get(y)) else None for r in group},
                       "best": _arm_name(winner[over]),
                       "at_edge": len(group) > 1 and winner in (group[0], group[-1])})
    return best, tuning


def _arm_name(value) -> str:
    """Arm label: 8.0 (a number read back from CSV) -> "8"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _records(sweep_dir: Path, run: str) -> list[dict]:
    return read_metrics(sweep_dir / run / "metrics.jsonl")


def _eval_curve(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def _curve_points(sweep_dir: Path, row: dict) -> list[tuple[float, float]]:
    """(FLOPs so far, held-out loss) along a run, from a quarter of its steps on."""
    flops_per_step = row["flops"] / row["steps"]
    return [(step * flops_per_step, loss) for step, loss in _eval_curve(_records(sweep_dir, row["run"]))
            if step >= row["steps"] / 4]


def _plot_fits(points, fits, ylabel, path, title):
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (name, pts) in enumerate(points.items()):
        color = f"C{i}"
        c = np.asarray([c for c, _ in pts])
        ax.scatter(c, [loss for _, loss in pts], color=color, s=12, label=name)
        if name in fits:
            grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 100)
            f = fits[name]
            ax.plot(grid, f.loss(grid), color=color, lw=1,
                    label=f"{name}: {f.e:.2f} + {f.a:.2f}(C/1e12)^-{f.alpha:.2f}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a short log axis overlap
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(ylabel.replace("_", " "))
    ax.set_title(title or "loss vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_curves(sweep_dir: Path, runs: list[str], path: Path, title: str):
    """Eval loss, max attention logit and (MoE runs) the worst layer's max/mean expert load over
    steps, one line per run."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    records = {run: _records(sweep_dir, run) for run in runs}
    has_load = any("expert_load_max_per_layer" in r for recs in records.values() for r in recs)
    fig = Figure(figsize=(16 if has_load else 11, 4))
    ax_loss, ax_logit, *ax_load = fig.subplots(1, 3 if has_load else 2)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        evals = _eval_curve(records[run])
        ax_loss.plot([s for s, _ in evals], [v for _, v in evals], marker="o", ms=3, color=color, label=run)
        logits = [(r["step"], r["max_logit"]) for r in records[run] if "max_logit" in r]
        ax_logit.plot([s for s, _ in logits], [v for _, v in logits], color=color, label=run)
        loads = [(r["step"], max(r["expert_load_max_per_layer"])) for r in records[run]
                 if r.get("expert_load_max_per_layer")]
        if ax_load and loads:
            ax_load[0].plot([s for s, _ in loads], [v for _, v in loads], color=color, label=run)
    ax_loss.set(xlabel="step", ylabel="held-out loss", title="held-out loss")
    ax_logit.set(xlabel="step", ylabel="max attention logit (all layers, heads)", title="max attention logit")
    ax_logit.legend(fontsize=6)
    if ax_load:
        ax_load[0].axhline(1.0, color="k", linewidth=0.8)
        ax_load[0].set(xlabel="step", ylabel="max expert load / mean (worst MoE layer)",
                       title="expert load balance (1 = perfect)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _markdown(rows, result, y, title) -> str:
    cols = [c for c in rows[0] if c not in ("params_total",)]
    lines = [f"# {title}", ""]
    if result["tuning"]:
        lines += [f"Each setting's {y} at every value tried (best in bold; 'edge': the best is an end of the "
                  "range, so a wider range might do better). The fits below use the best run of each setting.", "",
                  "| setting | tried | best | |", "|---|---|---|---|"]
        for t in result["tuning"]:
            tried = ", ".join(f"{v}: diverged" if loss is None else
                              (f"**{v}: {loss:.4f}**" if v == t["best"] else f"{v}: {loss:.4f}")
                              for v, loss in t["tried"].items())
            setting = ", ".join(f"{k}={v}" for k, v in t["setting"].items())
            lines.append(f"| {setting} | {tried} | {t['best']} | {'edge' if t['at_edge'] else ''} |")
        lines.append("")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    if result["arms"]:
        lines += ["", f"Fits of loss = E + A (C/1e12)^-alpha to {result['points']}:", "",
                  "| arm | E | A | alpha | degenerate |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {f['e']:.3f} | {f['a']:.3f} | {f['alpha']:.3f} | {f['degenerate'] or 'no'} |"
                  for n, f in result["arms"].items()]
    lines += [f"\nNo fit for arm {name}: {why}." for name, why in result["unfitted"].items()]
    for name, m in result["multipliers"].items():
        interval = m["interval_68"]
        if m["degenerate"]:
            spread = f" (not an estimate: degenerate fits, {m['degenerate']})"
        else:
            spread = f" (68%: {interval[0]:.2f}-{interval[1]:.2f})" if interval else " (no interval)"
        lines.append(f"\nCompute multiplier of **{name}** over {m['vs']} at loss {m['at_loss']:.3f}: "
                     f"**{m['value']:.2f}x**{spread}.")
    shared = result.get("shared_fit_multipliers", {})
    if "error" in shared:
        lines.append(f"\nNo shared-shape fit: {shared['error']}.")
    elif shared:
        lines += ["", "Shared-shape fit (one E and alpha for all arms, each arm's compute scaled by m): "
                  "m > 1 means the arm needs 1/m of the reference's compute for any loss.", "",
                  "| arm | m vs reference | 68% interval |", "|---|---|---|"]
        lines += [f"| {n} | {m['value']:.3f} | " + (f"{m['interval_68'][0]:.3f}-{m['interval_68'][1]:.3f}"
                                                    if m["interval_68"] else f"degenerate: {m['degenerate']}")
                  + " |" for n, m in shared.items()]
    lines += ["", "![loss vs compute](loss_vs_compute.png)", ""]
    if result["curves_plotted"]:
        lines += ["![curves](curves.png)", ""]
    else:
        lines += ["No per-run curves: the run directories (metrics.jsonl) are not here.", ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
