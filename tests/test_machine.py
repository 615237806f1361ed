"""The machine description that logs and benchmark reports carry beside their figures."""

from __future__ import annotations

from robkit.utils import machine

AMX = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_cpu_features_names_the_kernel_relevant_flags_present():
    assert machine.cpu_features(AMX) == ["avx2", "avx512f", "amx_bf16", "amx_tile"]
    assert machine.cpu_features(EPYC) == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert machine.cpu_features("model name\t: something without flags\n") == []


def test_machine_line_names_cpu_cores_and_features(monkeypatch):
    monkeypatch.setattr(machine, "cpu_name", lambda: "Intel Xeon")
    monkeypatch.setattr(machine, "cpu_features", lambda: ["amx_bf16"])
    line = machine.machine_line()
    assert line.startswith("Intel Xeon, ") and " cores, amx_bf16" in line
