"""The serving layers of ``model`` import without torch (the service image has none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_model_core_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, BlockTorch())
        import model, model.config, model.tokenizer, model.search, model.model_dir, model.decoding
        import model.signature, model.runtime, model.manifest, model.decode
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
