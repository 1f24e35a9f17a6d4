"""Device profiles: which runtime measures latency, with which settings, locally or via an agent.

A profile is a small YAML file in `devices/` (see devices/README.md for every field). Precision
is always explicit, because OpenVINO otherwise picks bf16 by itself on AVX-512 CPUs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from edgeprune.checks import Rule, check_values
from edgeprune.errors import EdgepruneError, choices_error
from edgeprune.latency.measurement import Protocol
from edgeprune.latency.verdict import STATISTICS

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
DEFAULT_PRECISION = {"onnxruntime": "fp32", "openvino": "f32", "tensorrt": "fp16"}  # each backend's default
DEVICES_ENV = "EDGEPRUNE_DEVICES"
FIELDS = {
    "name",
    "description",
    "backend",
    "options",
    "protocol",
    "channel_step",
    "agent",
    "token_env",
    "token_file",
    "tls_ca",
    "tls_fingerprint",
    "timeout_s",
    "unit_copies",
    "verdict_statistic",
}


def devices_dirs() -> list[Path]:
    """Where profiles are looked up: $EDGEPRUNE_DEVICES, ./devices, then the repository's devices/."""
    dirs = [Path(p) for p in os.environ.get(DEVICES_ENV, "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "devices", Path(__file__).resolve().parents[2] / "devices"]
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen and d.is_dir():
            seen.add(d.resolve())
            out.append(d)
    return out


@dataclass
class DeviceSpec:
    name: str
    backend: str
    options: dict = field(default_factory=dict)
    protocol: Protocol = field(default_factory=Protocol)
    description: str = ""
    channel_step: int | None = None
    agent: str | None = None  # http(s)://HOST:PORT of an `edgeprune agent serve`
    token_env: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None  # PEM file of the agent's CA (or its self-signed certificate)
    tls_fingerprint: str | None = None  # or the SHA-256 of the agent's certificate, pinned
    timeout_s: float = 600.0
    unit_copies: int = 1  # profile units alone (1) or in context (K summed copies vs one)
    verdict_statistic: str = "median"  # what "meets the budget" is decided on (latency/verdict.py)
    path: str | None = None

    @classmethod
    def from_dict(cls, d: dict, *, path: str | None = None) -> DeviceSpec:
        where = path or "device profile"
        if not isinstance(d, dict):
            raise EdgepruneError(f"{where}: expected a mapping of fields, got {type(d).__name__}")
        unknown = set(d) - FIELDS
        if unknown:
            raise EdgepruneError(f"{where}: unknown field(s) {sorted(unknown)}; see devices/README.md")
        if d.get("backend") not in BACKENDS:
            raise EdgepruneError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {d.get('backend')!r}")
        name = d.get("name") or (Path(path).stem if path else None)
        if not name:
            raise EdgepruneError(f"{where}: a profile needs a name")
        try:
            protocol = Protocol.from_dict(d.get("protocol"))
        except EdgepruneError as e:
            raise EdgepruneError(f"{where}: protocol: {e}") from None
        except (TypeError, ValueError) as e:
            raise EdgepruneError(f"{where}: bad protocol ({e})") from None
        copies = d.get("unit_copies", 1)
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
            raise EdgepruneError(f"{where}: unit_copies must be a whole number >= 1 (1 = units alone), got {copies!r}")
        _check_fields(d, where)
        return cls(
            name=name,
            backend=d["backend"],
            options=dict(d.get("options") or {}),
            protocol=protocol,
            description=d.get("description", ""),
            channel_step=d.get("channel_step"),
            agent=d.get("agent"),
            token_env=d.get("token_env"),
            token_file=d.get("token_file"),
            tls_ca=d.get("tls_ca"),
            tls_fingerprint=d.get("tls_fingerprint"),
            timeout_s=float(d.get("timeout_s", 600.0)),
            unit_copies=copies,
            verdict_statistic=d.get("verdict_statistic", "median"),
            path=path,
        )

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> DeviceSpec:
        """A profile by name (looked up in the devices folders) or by path to a YAML file."""
        p = Path(name_or_path)
        if not (p.suffix in (".yaml", ".yml") and p.is_file()):
            found = [d / f"{name_or_path}.yaml" for d in devices_dirs() if (d / f"{name_or_path}.yaml").is_file()]
            if not found:
                raise choices_error("device", str(name_or_path), list_profiles() or ["(no profiles found)"])
            p = found[0]
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise EdgepruneError(f"cannot read device profile {p}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data, path=str(p))

    @property
    def precision(self) -> str:
        """The precision the profile runs models in (its runtime's default where it names none)."""
        return self.options.get("precision") or DEFAULT_PRECISION[self.backend]

    def at_precision(self, precision: str) -> DeviceSpec:
        """This device at `precision`: itself where it runs that already; else the sibling profile
        named for it where one exists (cpu-onnxruntime -> cpu-onnxruntime-int8: its tables and
        step are that precision's), else this profile with the runtime's precision set and the
        name marked (a table of it is kept apart from the other precision's)."""
        if precision == self.precision:
            return self
        stem = self.name.removesuffix(f"-{self.precision}")
        sibling = f"{stem}-{precision}"
        where = [Path(self.path).parent] if self.path else []
        for d in [*where, *devices_dirs()]:
            if (d / f"{sibling}.yaml").is_file():
                other = DeviceSpec.load(d / f"{sibling}.yaml")
                if other.backend == self.backend and other.agent == self.agent and other.precision == precision:
                    return other
        options = {**self.options, "precision": precision}
        return replace(self, name=sibling, options=options, path=None, description=f"{self.description} ({precision})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocol"] = self.protocol.to_dict()
        d.pop("path")
        return d

    def make_backend(self):
        """The configured runtime (local only)."""
        from edgeprune.backends import make_backend

        return make_backend(self.backend, **self.options)


# the profile's own fields, besides the runtime's options and the protocol
FIELD_RULES = {
    "channel_step": Rule(int, lo=1, optional=True),
    "timeout_s": Rule(float, lo=0, lo_open=True),
    "agent": Rule(str, optional=True),
    "token_env": Rule(str, optional=True),
    "token_file": Rule(str, optional=True),
    "tls_ca": Rule(str, optional=True),
    "tls_fingerprint": Rule(str, optional=True),
    "verdict_statistic": Rule(str, choices=STATISTICS),
}


def _check_fields(d: dict, where: str) -> None:
    """Every field of a profile checked (its options by its runtime's rules) when it is read."""
    from edgeprune.backends import BACKENDS

    try:
        check_values({k: d[k] for k in FIELD_RULES if k in d}, FIELD_RULES, where="device profile", as_flag=False)
    except EdgepruneError as e:
        raise EdgepruneError(f"{where}: {e}") from None
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise EdgepruneError(f"{where}: options must be a mapping (threads: 1, ...), got {options!r}")
    BACKENDS[d["backend"]].check_options(options, where=where)
    agent = d.get("agent")
    if agent and not agent.startswith(("http://", "https://")):
        raise EdgepruneError(f"{where}: agent must be the agent's URL, http(s)://HOST:PORT, got {agent!r}")
    if (d.get("tls_ca") or d.get("tls_fingerprint")) and not (agent or "").startswith("https://"):
        raise EdgepruneError(f"{where}: tls_ca / tls_fingerprint need an https:// agent URL, got {agent!r}")
    if d.get("tls_fingerprint"):
        from edgeprune.agent.tls import normalise_fingerprint

        try:
            normalise_fingerprint(d["tls_fingerprint"])
        except EdgepruneError as e:
            raise EdgepruneError(f"{where}: {e}") from None


def list_profiles() -> list[str]:
    names = []
    for d in devices_dirs():
        names += [p.stem for p in sorted(d.glob("*.yaml")) if p.stem not in names]
    return names
