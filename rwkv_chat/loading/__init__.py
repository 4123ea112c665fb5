"""WHERE weights come from: original .pth files, transformers-format directories, hub ids and the catalog of
published models (catalog), read safely and placed, quantised and given their fast runner (loader).
"""
