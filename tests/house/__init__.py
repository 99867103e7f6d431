"""Tests of the tree as a whole: import arrows, the README's examples, words for users."""
