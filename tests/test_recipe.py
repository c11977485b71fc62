"""The recipe section ("Copy this part") copies as it stands: with the script's imports and nothing else it
defines every name it uses, and run alone, driven by a few lines of its own, it trains a tiny GPT-NeoX at tp 2
under torchrun (CPU) with the losses the script's own functions give; and the file keeps to 110 columns.

Run: python -m pytest tests/test_recipe.py -q
"""
import builtins
import json
import math
import symtable

from recipe_worker import recipe_source
from conftest import ROOT, torchrun


def test_the_recipe_uses_no_name_defined_outside_it():
    top = symtable.symtable(recipe_source(), "the recipe section", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}

    def collect(table):
        for child in table.get_children():
            if child.get_type() == "function":
                used.update(child.get_globals())
            collect(child)

    collect(top)
    assert "build_engine" in defined and "train_step" in defined
    assert not used - defined - set(dir(builtins)), sorted(used - defined - set(dir(builtins)))


def test_the_recipe_alone_trains_as_the_script_does(tmp_path):
    proc = torchrun(2, ROOT / "tests" / "recipe_worker.py", tmp_path / "out.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["tp"] == 2 and all(math.isfinite(x) for x in result["recipe"])
    assert result["recipe"] == result["script"], result
    assert result["recipe"][-1] < result["recipe"][0], result


def test_the_file_keeps_to_110_columns():
    long = [n for n, line in enumerate((ROOT / "autotp_custom_patterns.py").read_text().splitlines(), 1)
            if len(line) > 110]
    assert not long, f"lines over 110 columns: {long[:10]}"
