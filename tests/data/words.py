"""Word statistics for text files."""
import os


def read_lines(path):
    """Return the lines of a text file, without trailing newlines."""
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def count_words(path):
    """Count the words in a text file."""
    total = 0
    for line in read_lines(path):
        total += len(line.split())
    return total


def count_lines(path):
    """Count the lines in a text file."""
    
