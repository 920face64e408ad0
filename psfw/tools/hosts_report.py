"""The table ``psfw bench --hosts`` prints: per configuration, each variant's step
time against the link floor, and every host's bytes per step, link use and CPU."""

from __future__ import annotations

from psfw.tools.testbed import rate_text

VARIANTS = (
    ("insecure", "psfw insecure"),
    ("whole", "psfw whole"),  # insecure, every answer after the whole push (cluster.pipeline = false)
    ("tls", "psfw TLS"),
    ("ddp", "DDP (gloo)"),
)
MISSING = {"tls": "install the openssl command to compare", "ddp": 'pip install ".[peers]" to compare'}


def hosts_table(figures: dict) -> list[str]:
    """The report's lines: a heading, then a block per configuration."""
    lines = [
        f"benchmark MLP 784-1024-1024-10 ({figures['model_bytes'] / 1e6:.2f} MB float32), global batch "
        f"{figures['batch']}, SGD; {figures['steps']} measured steps after {figures['warmup']}; "
        f"{figures['cpus']} cores",
        "floor: the busiest link's larger direction at the rate (directions overlapped); serial: its two "
        "directions one after the other; CPU, packets, machine: the share of the cores the hosts' processes, the "
        "kernel's packet work and everything used",
    ]
    for entry in figures["hosts"]:
        lines += ["", *_block(entry)]
    return lines


def _block(entry: dict) -> list[str]:
    n, k = entry["worker_hosts"], entry["shard_hosts"]
    lines = [
        f"{n} worker hosts x {k} shard hosts, each link {rate_text(entry['link_bits_per_s'])} each way "
        f"(model floor: parameter server {entry['ps_model_floor_s']:.3f} s, ring all-reduce {entry['ring_model_floor_s']:.3f} s)",
        f"  {'':<14} {'step s':>7} {'samples/s':>10} {'floor s':>8} {'step/floor':>10} {'serial s':>9} "
        f"{'CPU':>5} {'packets':>7} {'machine':>7}",
    ]
    ran = [(key, label) for key, label in VARIANTS if entry.get(key) is not None]
    for key, label in VARIANTS:
        v = entry.get(key)
        if v is None:
            if key in MISSING:
                lines.append(f"  {label:<14} not run ({MISSING[key]})")
            continue
        saturated = "  CPU-bound" if v["cpu_saturated"] else ""
        lines.append(
            f"  {label:<14} {v['step_s']:7.3f} {v['samples_per_s']:10,.0f} {v['link_floor_s']:8.3f} "
            f"{v['step_over_floor'] or float('nan'):10.2f} {v['link_serial_s']:9.3f} {v['cpu_share']:5.2f} "
            f"{v['packet_share']:7.2f} {v['machine_busy']:7.2f}{saturated}"
        )
    lines.append("  per link: MB per step up/down, busy up/down, CPU s per step of the host's processes")
    lines.append(("  " + f"{'host':<5}" + "".join(f" {label:<30}" for _, label in ran)).rstrip())
    for host in entry[ran[0][0]]["links"]:
        cells = []
        for key, _ in ran:
            link = entry[key]["links"][host]
            cells.append(
                f"{link['up_bytes'] / 1e6:5.2f}/{link['down_bytes'] / 1e6:5.2f} "
                f"{link['busy_up']:4.0%}/{link['busy_down']:4.0%} {link['cpu_s']:5.3f}"
            )
        lines.append(("  " + f"{host:<5}" + "".join(f" {cell:<30}" for cell in cells)).rstrip())
    return lines


__all__ = ["hosts_table"]
