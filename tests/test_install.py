"""The Caffe installer's cache: keyed by options, complete only with its marker and artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import install_caffe  # noqa: E402


def test_key_depends_on_options() -> None:
    cpu, cuda = install_caffe.build_options(False), install_caffe.build_options(True)
    assert install_caffe.cache_key(cpu) != install_caffe.cache_key(cuda)
    assert install_caffe.cache_key(cpu) == install_caffe.cache_key(dict(cpu))
    assert install_caffe.cache_key(cpu) != install_caffe.cache_key({**cpu, "numpy": "0.0"})


def test_installed_cache_is_complete() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "install_caffe.py"), "--check"])
    assert result.returncode == 0


def test_incomplete_caches_are_not_trusted(tmp_path: Path) -> None:
    options = install_caffe.build_options(False)
    prefix = install_caffe.build_dir(tmp_path, options)
    assert not install_caffe.is_complete(prefix, options)
    artifacts = ["build/lib/libcaffe.so.1.0.0-rc3", "python/caffe/_caffe.so"]
    for rel in artifacts:
        (prefix / rel).parent.mkdir(parents=True, exist_ok=True)
        (prefix / rel).write_bytes(b"x")
    marker = prefix / install_caffe.COMPLETE_MARKER
    marker.write_text(json.dumps({"options": options, "artifacts": artifacts}))
    assert install_caffe.is_complete(prefix, options)
    (prefix / artifacts[0]).unlink()
    assert not install_caffe.is_complete(prefix, options)
    marker.write_text(json.dumps({"options": {**options, "device": "cuda"}, "artifacts": []}))
    assert not install_caffe.is_complete(prefix, options)
    marker.write_text("{not json")
    assert not install_caffe.is_complete(prefix, options)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "install_caffe.py"), "--check", "--cache", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "missing or incomplete" in result.stdout
