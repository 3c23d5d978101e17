"""A load step's timeline as a PNG: offered load and tokens/s, running replicas per deployment, and
latencies, in panels sharing the time axis, with the phase boundaries drawn across all of them."""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install 'glm-ray[bench]'"


def require_matplotlib() -> None:
    """Fail before any load is sent, not after minutes of it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"glm-ray: error: --load-step draws its timeline with matplotlib, which is not "
                         f"installed: {INSTALL_HINT}") from None


def _values(timeline: list[dict], key: str) -> list[float]:
    return [float("nan") if row[key] is None else row[key] for row in timeline]


def plot_timeline(report: dict, path: str | Path) -> None:
    # a bare Figure renders with Agg and leaves pyplot's global backend alone
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    timeline, phases = report["timeline"], report["phases"]
    edges = [row["t_s"] for row in timeline] + [timeline[-1]["t_s"] + timeline[-1]["seconds"]]  # one bin a row
    middles = [row["t_s"] + row["seconds"] / 2 for row in timeline]
    fig = Figure(figsize=(11, 9), layout="constrained")
    load, replicas, latency = fig.subplots(3, 1, sharex=True)

    load.stairs(_values(timeline, "clients"), edges, baseline=None, color="tab:gray", label="clients (offered)")
    load.stairs(_values(timeline, "in_flight"), edges, baseline=None, color="tab:gray", linestyle=":",
                label="mean in flight")
    load.set_ylabel("clients")
    tokens = load.twinx()
    tokens.stairs(_values(timeline, "output_tokens_per_s"), edges, baseline=None, color="tab:blue",
                  label="output tokens/s")
    tokens.set_ylabel("output tokens/s")
    handles = load.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    load.legend(handles=handles, loc="upper left", fontsize="small")

    names = sorted({name for row in timeline for name in (row["replicas"] or {})})
    for name in names:
        running = [float("nan") if not row["replicas"] or name not in row["replicas"]
                   else row["replicas"][name].get("running", 0) for row in timeline]
        replicas.stairs(running, edges, baseline=None, label=name, linewidth=1.5)
    replicas.set_ylabel("running replicas")
    replicas.yaxis.set_major_locator(MaxNLocator(integer=True))
    if names:
        replicas.legend(loc="upper left", fontsize="small", ncol=min(4, len(names)))
    else:
        replicas.text(0.5, 0.5, "no deployment replicas in /metrics", transform=replicas.transAxes, ha="center")

    for key, style, label in (("latency_p50_s", "-", "latency p50"), ("latency_p99_s", "--", "latency p99"),
                              ("ttft_p50_s", ":", "TTFT p50"), ("ttft_p99_s", "-.", "TTFT p99")):
        latency.plot(middles, _values(timeline, key), linestyle=style, marker=".", label=label)
    latency.set_ylabel("seconds (requests ending that second)")
    latency.set_xlabel("seconds from the start")
    latency.legend(loc="upper left", fontsize="small")

    for ax in (load, tokens, replicas, latency):
        ax.set_ylim(bottom=0)
    for ax in (load, replicas, latency):
        for phase in phases[1:]:
            ax.axvline(phase["start_s"], color="black", linewidth=0.8, alpha=0.5)
        ax.grid(alpha=0.3)
    for phase in phases:
        load.annotate(f"{phase['clients']} client{'' if phase['clients'] == 1 else 's'}", (phase["start_s"], 1),
                      xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                      fontsize="small")
    fig.suptitle(f"load step against {report['url']} ({report['model']}): {report['schedule']}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
