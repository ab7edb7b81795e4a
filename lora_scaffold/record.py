"""The generation record: one JSON file per generated layer, `.lora-scaffold/<module>.json` beside plugin output
(commit it with the layer) or at the root of a patched peft checkout (where a `.gitignore` keeps it out of the
pull request). `remove`, `check`, the tests and `update` read it; nothing is read back from comments. It keeps the
text of every file it lists, the base `update` merges your edits from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from lora_scaffold import __version__
from lora_scaffold.errors import ScaffoldError
from lora_scaffold.request import Request


RECORD_DIR = ".lora-scaffold"
RECORD_FORMAT = 1
# In a peft checkout, the records stay out of git (and so out of the pull request).
IGNORE_FILE = f"{RECORD_DIR}/.gitignore"
IGNORE_TEXT = "# Written by lora-scaffold: its generation records stay out of the pull request.\n*\n"


def record_path(module_name: str) -> str:
    return f"{RECORD_DIR}/{module_name}.json"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GenerationRecord:
    request: Request
    mode: str
    peft_version: str
    layer_api: str
    target: str
    constructor: dict[str, str]
    strategy: str
    reason: str
    verdicts: list[dict]
    layer_class: str
    module_name: str
    files: dict[str, str]  # path (from the output root) -> sha256 of the text lora-scaffold wrote
    edits: dict | None = None  # patch mode: what was added to PEFT's own files
    pristine: dict[str, str] = field(default_factory=dict)  # path -> the text written: `update`'s merge base
    tool_version: str = __version__
    format: int = field(default=RECORD_FORMAT)

    @property
    def path(self) -> str:
        return record_path(self.module_name)

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "tool_version": self.tool_version,
            "mode": self.mode,
            "request": self.request.as_dict(),
            "target": self.target,
            "constructor": self.constructor,
            "strategy": self.strategy,
            "reason": self.reason,
            "verdicts": self.verdicts,
            "peft_version": self.peft_version,
            "layer_api": self.layer_api,
            "layer_class": self.layer_class,
            "module_name": self.module_name,
            "files": self.files,
            "edits": self.edits,
            "pristine": self.pristine,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> GenerationRecord:
        try:
            data = json.loads(text)
            if data.get("format") != RECORD_FORMAT:
                raise ScaffoldError(f"{where}: record format {data.get('format')!r}, this lora-scaffold reads 1")
            request = Request.from_dict(data.pop("request"), f"{where} (request)")
            del data["format"]
            return cls(request=request, **data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ScaffoldError(f"{where} is not a lora-scaffold generation record ({exc})") from None
