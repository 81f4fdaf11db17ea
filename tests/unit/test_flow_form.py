"""The Prefect side: the flow's config parameter renders as a form, and Prefect code stays free of torch."""

import subprocess
import sys


def test_flow_parameter_form_has_dropdowns_and_descriptions():
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    schema = parameter_schema(finetune).model_dump()
    defs = schema["definitions"]
    train = defs["TrainConfig"]["properties"]
    assert train["method"]["enum"] == ["qlora", "lora", "full", "freeze"]
    assert "reduce_lr_on_plateau" in train["lr_scheduler"]["enum"]
    assert defs["DatasetConfig"]["properties"]["format"]["enum"] == ["alpaca", "sharegpt", "messages", "preference"]
    assert train["objective"]["enum"] == ["sft", "dpo", "orpo"]
    for name, definition in defs.items():
        for key, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description for the Prefect form"


def test_prefect_modules_do_not_import_torch():
    code = (
        "import sys, tuneflow.core.config\n"
        "assert set(sys.modules) & {'prefect', 'torch', 'mlflow'} == set(), 'config'\n"
        "import flows.finetune; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'flow'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
