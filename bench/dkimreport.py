"""Summary (medians, ratios with their per-round spread) and markdown tables of bench/dkimcost.py."""

from __future__ import annotations

from common import median

ALGS = ("rsa", "ed25519")


def _pairs(targets: list[str], variants: dict[str, str]) -> list[tuple[str, str]]:
    """(a, b) of every ratio a / b reported: each mox with DKIM against Postfix without, against
    Postfix + OpenDKIM and against itself without; OpenDKIM's cost; variants against mox."""
    pairs = []
    for alg in ALGS:
        od = f"postfix+opendkim-{alg}"
        pairs.append((od, "postfix"))
        for m in ["mox", *variants]:
            pairs += [(f"{m}-{alg}", "postfix"), (f"{m}-{alg}", od), (f"{m}-{alg}", m)]
        pairs += [(f"{v}-{alg}", f"mox-{alg}") for v in variants]
    pairs += [(m, "postfix") for m in ["mox", *variants]] + [(v, "mox") for v in variants]
    return [(a, b) for a, b in pairs if a in targets and b in targets]


def summarise(results: dict, variants: dict[str, str]) -> dict:
    out = {k: results[k] for k in ("rounds", "scale", "loadavg", "opendkim")}
    out["directions"] = {}
    for d, cases in results["directions"].items():
        out["directions"][d] = {}
        for label, per in cases.items():
            cpu = results["cpu"][d][label]
            row: dict = {"targets": {}, "ratios": {}, "cpu_ratios": {}}
            for t, rates in per.items():
                row["targets"][t] = {"median": round(median(rates), 1), "runs": [round(x, 1) for x in rates],
                                     "cpu_ms_per_msg": round(median(cpu[t]), 3),
                                     "cpu_runs": [round(x, 3) for x in cpu[t]]}
            for a, b in _pairs(list(per), variants):
                n = min(len(per[a]), len(per[b]))
                rounds = [round(per[a][i] / per[b][i], 2) for i in range(n)]
                row["ratios"][f"{a}/{b}"] = {"median": round(median(per[a]) / median(per[b]), 3),
                                             "rounds": rounds, "min": min(rounds), "max": max(rounds)}
                row["cpu_ratios"][f"{a}/{b}"] = round(median(cpu[a]) / median(cpu[b]), 3)
            out["directions"][d][label] = row
    return out


def table(s: dict) -> str:
    lines = [f"median of {s['rounds']} interleaved rounds; OpenDKIM {s['opendkim']}; "
             f"load average per round {s['loadavg']}", ""]
    for d, cases in s["directions"].items():
        targets = list(next(iter(cases.values()))["targets"])
        lines += [f"### {d}: msgs/s (server CPU ms per message = s per 1,000)", "",
                  "| case | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
        for label, row in cases.items():
            cells = [f"{row['targets'][t]['median']:.0f} ({row['targets'][t]['cpu_ms_per_msg']:.2f})"
                     if t in row["targets"] else "-" for t in targets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| case | ratio | msgs/s | rounds | CPU |", "|---|---|---|---|---|"]
        for label, row in cases.items():
            for k, r in row["ratios"].items():
                lines.append(f"| {label} | {k} | {r['median']:.2f}x | {r['min']:.2f}-{r['max']:.2f} | "
                             f"{row['cpu_ratios'][k]:.2f}x |")
        lines.append("")
    return "\n".join(lines)
