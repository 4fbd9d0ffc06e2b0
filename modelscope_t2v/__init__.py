"""modelscope-t2v"""
