"""router/protocol.py is the one source of the C core's constants (router/genheader.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from router import fastlane, fastlane_load, genheader
from router import protocol as p


def test_the_generator_reads_the_values_python_imports() -> None:
    values = genheader.read_constants()
    assert values == {name: getattr(p, name) for name in p.C_EXPORTS}
    assert genheader.digest(values) == fastlane.PROTOCOL_DIGEST
    text = genheader.render(values)
    assert f"#define MAX_MODEL_NAME_BYTES {p.MAX_MODEL_NAME_BYTES}\n" in text
    assert '#define PROTOCOL "gpu-pool/1"\n#define PROTOCOL_LEN 10\n' in text
    assert "    double deadline;\n} req_info_t;" in text


def test_a_changed_constant_changes_the_header_and_its_digest(tmp_path: Any) -> None:
    with open(genheader.SOURCE, encoding="utf-8") as f:
        source = f.read()
    changed = tmp_path / "protocol.py"
    changed.write_text(
        source.replace("MAX_MODEL_NAME_BYTES: Final = 128", "MAX_MODEL_NAME_BYTES: Final = 99")
    )
    header = tmp_path / "out.h"
    assert genheader.write_header(str(header), str(changed))
    assert "#define MAX_MODEL_NAME_BYTES 99\n" in header.read_text()
    assert not genheader.write_header(str(header), str(changed))  # unchanged: not rewritten
    assert genheader.digest(genheader.read_constants(str(changed))) != fastlane.PROTOCOL_DIGEST


def test_an_export_that_is_not_a_constant_is_refused(tmp_path: Any) -> None:
    bad = tmp_path / "protocol.py"
    bad.write_text('from typing import Final\nX: Final = len("a")\nC_EXPORTS: Final = ("X",)\n')
    with pytest.raises(ValueError, match="not literal constants"):
        genheader.read_constants(str(bad))


@pytest.mark.skipif(not fastlane.available(), reason="router/_fastlane not built")
def test_a_library_built_from_other_constants_is_refused(monkeypatch: Any) -> None:
    # load() lives in router.fastlane_load and reads that module's cache and digest.
    monkeypatch.setattr(fastlane_load, "_lib", None)
    monkeypatch.setattr(fastlane_load, "PROTOCOL_DIGEST", fastlane.PROTOCOL_DIGEST ^ 1)
    with pytest.raises(fastlane.FastlaneUnavailable, match="other router/protocol.py"):
        fastlane.load()


def test_the_generated_header_is_not_committed() -> None:
    # Built, never edited; .gitignore keeps it out of the tree (see router/genheader.py).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".gitignore"), encoding="utf-8") as f:
        ignored = f.read().split()
    assert "router/fastlane_protocol.h" in ignored
