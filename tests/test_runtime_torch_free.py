"""The runtime never imports torch, directly or indirectly."""

import subprocess
import sys

RUNTIME_MODULES = ["edgecap.runtime.captioner", "edgecap.runtime.engines", "edgecap.runtime.engines.ort",
                   "edgecap.runtime.decode", "edgecap.runtime.search",
                   "edgecap.runtime.sources", "edgecap.runtime.render", "edgecap.runtime.attend",
                   "edgecap.runtime.cli", "edgecap.runtime.manifest", "edgecap.runtime.timing",
                   "edgecap.runtime.files",
                   # the console scripts of the commands that need an extra: they check for it first
                   "edgecap.commands",
                   # scale-out on Ray: Serve deployment and Ray Data pipeline
                   "edgecap.scale.serve", "edgecap.scale.deployment", "edgecap.scale.batch",
                   # plain-Python data code that torch-free tools (the latency benchmark's variants) import
                   "edgecap.train.synthetic", "edgecap.train.datasets"]


def test_runtime_imports_without_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
            "            raise ImportError('torch is blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            + "".join(f"import {m}\n" for m in RUNTIME_MODULES)
            + "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-1500:]


def test_blocker_catches_a_torch_import():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import edgecap.train.engine\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked" in proc.stderr
