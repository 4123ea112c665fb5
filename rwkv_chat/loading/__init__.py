"""WHERE weights come from: original .pth files, transformers-format directories (their key names mapped to
the original ones by hf_names, the one table the hf/ wing reads too), hub ids and the catalog of published
models (catalog), read safely, placed, quantised and given their fast runner (loader).
"""
