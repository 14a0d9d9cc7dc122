"""Inputs: names to files. Local folders and Hub repo ids, resolved to the files a plan reads."""
