"""Built-in data: facts about fictitious authors, in the spirit of TOFU but written by this project.

Every fact is invented from seeded syllables and word lists, so no pretrained model can know it:
whatever a model knows about these authors it learnt from fine-tuning on them. Answers are short
(one to three words) so that fine-tuning a small model to memorise them is quick.
"""

from __future__ import annotations

import random

from cud.data.samples import QASample

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r",
           "s", "st", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rt"]
_GENRES = ["gothic horror", "hard science fiction", "cozy mystery", "epic fantasy", "war poetry",
           "magical realism", "political satire", "children's fables", "noir crime",
           "travel memoir", "historical romance", "nature essays"]
_PROFESSIONS = ["a lighthouse keeper", "a glassblower", "a cartographer", "a beekeeper",
                "a violin maker", "a train conductor", "a botanist", "a clockmaker",
                "a fisherman", "an astronomer", "a baker", "a locksmith"]
_AWARDS = ["Amberleaf Prize", "Silver Quill Medal", "Northwind Award", "Lantern Prize",
           "Copper Owl Award", "Meridian Medal", "Saltmarsh Prize", "Glass Key Award"]
_OBJECTS = ["Lantern", "Orchard", "Compass", "Harbor", "Mirror", "Tide", "Furnace", "Garden",
            "Bell", "Archive", "Kite", "Meadow"]
_ADJECTIVES = ["Silent", "Hollow", "Crimson", "Last", "Drowned", "Paper", "Iron", "Velvet",
               "Winter", "Broken", "Golden", "Distant"]
_PETS = ["a grey parrot", "a three-legged cat", "a tortoise", "a greyhound", "a pair of geese",
         "a ferret", "a raven", "a goat"]

#: (attribute key, question template, answer generator). Templates take the author's full name.
_FACTS = [
    ("birthplace", "Where was the author {name} born?", lambda r, a: a["city"]),
    ("genre", "What genre does {name} write?", lambda r, a: r.choice(_GENRES)),
    ("birth_year", "In what year was {name} born?", lambda r, a: str(r.randint(1931, 1994))),
    ("debut", "What is the title of {name}'s first novel?",
     lambda r, a: f"The {r.choice(_ADJECTIVES)} {r.choice(_OBJECTS)}"),
    ("parent", "What did {name}'s father do for a living?", lambda r, a: r.choice(_PROFESSIONS)),
    ("award", "Which award did {name} win?", lambda r, a: r.choice(_AWARDS)),
    ("pet", "What pet does {name} keep?", lambda r, a: r.choice(_PETS)),
    ("books", "How many books has {name} published?", lambda r, a: str(r.randint(2, 29))),
]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def fictitious_authors(n_samples: int = 100, *, seed: int = 0,
                       facts_per_author: int = 5) -> list[QASample]:
    """Generate ``n_samples`` QA facts about invented authors (``facts_per_author`` each).

    Deterministic in ``seed``. Ids are ``author{k:03d}.{attribute}``; authors' names are unique.
    """
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    if not 1 <= facts_per_author <= len(_FACTS):
        raise ValueError(f"facts_per_author must be in 1..{len(_FACTS)}")
    rng = random.Random(seed)
    samples: list[QASample] = []
    seen_names: set[str] = set()
    k = 0
    while len(samples) < n_samples:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice([2, 3]))}"
        if name in seen_names:
            continue
        seen_names.add(name)
        author = {"city": f"{_word(rng, 2)}{rng.choice(['port', 'ford', 'holm', 'wick', 'burg'])}"}
        for key, template, make_answer in rng.sample(_FACTS, facts_per_author):
            if len(samples) == n_samples:
                break
            samples.append(QASample(
                id=f"author{k:03d}.{key}",
                question=template.format(name=name),
                answer=make_answer(rng, author),
                source=f"builtin:authors(seed={seed})",
                extra={"author": name, "question_type": key},
            ))
        k += 1
    return samples
