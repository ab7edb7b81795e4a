"""Which PEFT the generated code is for: the mode, and what that PEFT version offers, worked out once per run.

Generated code contains no run-time version tests: every difference between PEFT versions is decided here, at
generation time, and the layer says in its header which versions it is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from lora_scaffold.errors import ScaffoldError


PLUGIN, PATCH = "plugin", "patch"
CONFIG_API, KWARGS_API = "config", "kwargs"
OLDEST_SUPPORTED = (0, 13)

# The releases from which generated code may rely on something, by what it is.
LORA_BIAS = (0, 14)  # LoraConfig.lora_bias and the layer's lora_bias dict
CAST_INPUT_DTYPE = (0, 15)  # LoraLayer._cast_input_dtype
LORA_VARIANTS = (0, 16)  # LoraVariant, through which DoRA plugs into a layer
TARGET_PARAMETERS = (0, 17)  # lora.ParamWrapper: PEFT wraps single parameters (`target_parameters`)
PEFT_WARNING = USE_RSLORA_DICT = SET_ADAPTER_INFERENCE_MODE = (0, 18)  # and set_adapter takes inference_mode
CONFIG_LAYER_API = (0, 19)  # layers receive the LoraConfig instead of one keyword argument per option
DEVICE_HOOK = (0, 19)  # PEFT asks a layer `_get_base_layer_device_and_dtype` (for any module, not only its own)
TAGGED_VARIANTS = (0, 20)  # LoraLayer.resolve_lora_variant matches the config against `lora_variants`
DORA_UNMERGE_TRANSPOSES = (0, 21)  # DoraLinearVariant.unmerge honours fan_in_fan_out
QUANTIZATION_BACKEND = (0, 21)  # peft.utils.quantization_utils: QuantizationBackend, resolve_quantization_backend
# LoraConfig options by the release that added them (older ones are in every supported peft).
OPTION_RELEASES = {"lora_bias": LORA_BIAS}
RELEASES = sorted(
    {
        LORA_BIAS,
        CAST_INPUT_DTYPE,
        LORA_VARIANTS,
        TARGET_PARAMETERS,
        PEFT_WARNING,
        CONFIG_LAYER_API,
        TAGGED_VARIANTS,
        DORA_UNMERGE_TRANSPOSES,
        QUANTIZATION_BACKEND,
    }
)

# What every file in a peft source tree starts with: patch mode's generated files too.
LICENSE_HEADER = """\
# Copyright 2026-present the HuggingFace Inc. team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License."""


@dataclass(frozen=True)
class PeftRelease:
    """Generated code is written for plugin use (an installed peft) or patch mode (a peft source checkout)."""

    mode: str
    version: tuple[int, ...]

    def has(self, release: tuple[int, int]) -> bool:
        return self.version >= release

    def has_option(self, name: str) -> bool:
        return self.has(OPTION_RELEASES.get(name, OLDEST_SUPPORTED))

    @property
    def api(self) -> str:
        return CONFIG_API if self.has(CONFIG_LAYER_API) else KWARGS_API

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def versions(self) -> str:
        """The peft versions the generated code is right for: those between two releases that change it."""
        lower = max((r for r in RELEASES if self.has(r)), default=OLDEST_SUPPORTED)
        upper = min((r for r in RELEASES if not self.has(r)), default=None)
        if upper is None:
            return f"peft >= {_short(lower)}"
        last = (upper[0], upper[1] - 1)
        return f"peft {_short(lower)}" if last == lower else f"peft {_short(lower)} - {_short(last)}"


def release_for(mode: str, version_text: str | None) -> PeftRelease:
    """A clear error for a missing or too old peft."""
    if version_text is None:
        raise ScaffoldError("peft is not installed; install peft>=0.13")
    found = parse_version(version_text)
    if found < OLDEST_SUPPORTED:
        raise ScaffoldError(f"peft {version_text} is too old: lora-scaffold generates layers for peft>=0.13")
    return PeftRelease(mode, found)


def installed_peft(mode: str = PLUGIN) -> PeftRelease:
    try:
        found = version("peft")
    except PackageNotFoundError:
        found = None
    return release_for(mode, found)


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _short(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release[:2]))
