"""A small general-knowledge QA set, for model utility (METHOD §6): facts any pretrained
instruction model should know and unlearning a set of invented authors should not disturb."""

from __future__ import annotations

from cud.data.samples import QASample

_FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("How many days are in a week?", "seven"),
    ("How many legs does a spider have?", "eight"),
    ("What is the freezing point of water in degrees Celsius?", "0 degrees"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("What is the longest river in Africa?", "the Nile"),
    ("On which continent is Brazil?", "South America"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
    ("What language is mainly spoken in Mexico?", "Spanish"),
    ("What is the currency of the United States?", "the dollar"),
    ("What color is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"),
    ("How many continents are there on Earth?", "seven"),
    ("What is the closest star to Earth?", "the Sun"),
    ("Which animal is known as the king of the jungle?", "the lion"),
]


def general_knowledge() -> list[QASample]:
    """The built-in general-knowledge QA set (ids ``general.NN``)."""
    return [QASample(id=f"general.{i:02d}", question=q, answer=a, source="builtin:general")
            for i, (q, a) in enumerate(_FACTS)]
