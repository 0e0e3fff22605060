"""The agent's tools and what backs them: the knowledge base, indexes, crop, the tool server and client.

This package imports neither `mmsearch` nor `data_pipeline`.
"""
