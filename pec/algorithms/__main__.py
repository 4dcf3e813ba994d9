"""`python -m pec.algorithms`: print the README's algorithm x regulariser table (what `pec.train` accepts,
and why it refuses the rest)."""
from pec.algorithms import composition_markdown

print(composition_markdown())
