"""gradmon's model classes are registered with Keras whatever gradmon module is imported first.

Registering imports `gradmon.monitored`; when Keras' first import came from inside a gradmon
module still being imported (`import gradmon.measure.statistics` first), doing it at once
hit a half-imported module and warned "could not register" instead.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.tensorflow_only

CHECK = """
import sys, warnings
warnings.simplefilter("error")
{first}
import keras
monitored = sys.modules.get("gradmon.monitored")
print("REGISTERED", monitored is not None and hasattr(monitored, "monitor"))
"""


@pytest.mark.parametrize("first", ["import gradmon.measure.statistics", "import gradmon; gradmon.statistics"])
def test_classes_are_registered_whichever_module_comes_first(first):
    result = subprocess.run([sys.executable, "-c", CHECK.format(first=first)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REGISTERED True" in result.stdout
