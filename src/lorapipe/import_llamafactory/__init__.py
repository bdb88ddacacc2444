"""`lorapipe import-llamafactory`: a LLaMA-Factory train YAML (+ merge YAML, dataset_info.json) ->
the equivalent params.yaml sections (model, data.sources, train, lora, merge).

    lorapipe import-llamafactory examples/train_lora/qwen2_5_1_5b_lora_sft.yaml \\
        --merge-yaml examples/merge_lora/qwen2_5_1_5b_lora_sft.yaml --dataset-info data/dataset_info.json
    # prints the sections as YAML; --out FILE writes them to a file; --write updates params.yaml in place

Every key of the input is accounted for on stderr: mapped (to which params key), ignored on purpose
(with the reason: lorapipe fixes that itself, e.g. output_dir), not supported (a LLaMA-Factory
feature lorapipe has no equivalent for), or unknown (not a LLaMA-Factory argument: a warning naming it,
most likely a typo). Keys the YAML leaves out take LLaMA-Factory's defaults where those differ from
lorapipe's (lora_dropout 0, lora_alpha = 2 x rank, scheduler linear, ...), so the run is the same.

One module per job: keys.py (the tables: what each argument becomes), mapping.py (arguments ->
sections, with the report), dataset_info.py (`dataset` -> data.sources), command.py (the command).
"""

from lorapipe.import_llamafactory.command import HELP, add_arguments, convert, main

__all__ = ["HELP", "add_arguments", "convert", "main"]
