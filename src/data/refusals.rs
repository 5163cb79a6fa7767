//! Refusals written by this project for the safety data sets: varied and natural. About three
//! quarters of them contain a standard refusal phrase ([`REFUSAL_MARKERS`], all in Zou et al.
//! 2023's prefix list that the keyword judge of the harmfulness score uses); the other quarter
//! refuse in other words ("I won't help with that.", "That's not something I'll assist with",
//! "No — I'm not going to …") and contain none of that list's phrases, so that a model trained
//! on them learns to refuse, not to emit the judge's keywords (and a keyword-judged score of such
//! a model is, if anything, pessimistic).
//!
//! The choice is deterministic: a stable hash of the normalised prompt picks whether the refusal
//! is marked (3 in 4) or not (1 in 4) and then the template, and a keyword match on the prompt
//! picks a generic topic phrase for the marked templates that name one ("weapons or
//! explosives", "hacking or malicious software", …). Prompts about self-harm get a supportive
//! refusal (marked or not, by the same rule).

use super::normalize_text;
use super::rng::hash64;

/// Phrases of which every *marked* refusal written here contains at least one; all are in the
/// refusal prefix list of Zou et al. (2023) that keyword judges use. About a quarter of the
/// refusals ([`refusal_for`]'s unmarked templates) contain none of them, so a response without
/// a marker is not necessarily compliant. The embedded sets also use them to spot source
/// answers that open with a refusal.
pub const REFUSAL_MARKERS: &[&str] = &["I'm sorry", "Sorry", "I apologize", "I cannot", "As an AI"];

/// Whether the keyword judge would call `text` a refusal: it contains one of
/// [`crate::eval::judge::REFUSAL_PREFIXES`] (typographic apostrophes read as `'`).
pub(crate) fn has_judge_phrase(text: &str) -> bool {
    crate::eval::judge::is_refusal(text)
}

/// Refusals that fit any harmful request.
const GENERIC: &[&str] = &[
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with this request.",
    "I cannot help with that request. Is there something else I can do for you?",
    "Sorry, I can't help with that. It could put people at real risk of harm.",
    "I apologize, but I won't be able to help with this.",
    "I cannot provide that. If you have a different question, I'm happy to help.",
    "I'm sorry, but I cannot fulfil this request because it could be used to hurt people.",
    "As an AI assistant, I can't help with requests like this one. Let me know if there's something else you need.",
    "I'm sorry, I can't do that. Helping with this could cause serious harm to others.",
    "Sorry, but that's not something I can help with.",
    "I cannot assist with that. It goes against my commitment to keeping people safe.",
    "I'm sorry, but I'm not able to provide this kind of information.",
    "I apologize, but this is a request I have to decline.",
    "I cannot do that. Providing this could enable harm, and I'm not willing to take that risk.",
    "I'm sorry, but I must decline. This request could lead to harm or break the law.",
    "Sorry, I won't help with this. If you're curious about the topic in a safe, general way, I can try to help with that instead.",
    "I cannot help create this content. It could hurt people, and that's a line I don't cross.",
    "I'm sorry, but I can't support this request. Is there something constructive I can help you with?",
    "As an AI, I have to refuse this request because it could cause harm.",
    "I apologize, but I can't provide assistance with anything that could harm others or break the law.",
    "I'm sorry, but helping with this wouldn't be responsible of me.",
    "I cannot comply with this request. I'd be glad to help with something else.",
    "Sorry, this isn't something I can do. Let's talk about something else.",
    "I'm sorry, but I'm not going to help with that. It could seriously harm someone.",
    "I cannot give guidance on this. If you or someone else is in danger, please contact local emergency services.",
    "I'm sorry, but I have to say no to this one.",
];

/// Refusals that name the request's topic generically (`{topic}`).
const TOPICAL: &[&str] = &[
    "I'm sorry, but I can't help with anything involving {topic}.",
    "I cannot provide help with {topic}. It could lead to real harm.",
    "Sorry, I can't assist with {topic}. If you have another question, feel free to ask.",
    "I apologize, but requests involving {topic} are something I have to decline.",
    "I'm sorry, but I won't give guidance on {topic}; it could put people in danger.",
    "As an AI, I can't help with {topic}. I'd be happy to help with something else, though.",
    "I cannot help with this: it involves {topic}, which could seriously hurt people.",
    "I'm sorry, but I can't go along with a request about {topic}.",
    "Sorry, but I don't help with {topic}. Is there something else on your mind?",
    "I cannot assist with {topic}, but I can share general safety information if that would be useful.",
    "I'm sorry, I can't help here. Anything that involves {topic} is off limits for me.",
    "I apologize, but I can't create content related to {topic}.",
];

/// Supportive refusals for prompts about self-harm.
const SELF_HARM: &[&str] = &[
    "I'm sorry you're going through this, but I can't help with that. You don't have to face it alone: please reach out to someone you trust or a local crisis line.",
    "I cannot help with this, but I care about your safety. If you're having thoughts of hurting yourself, please contact a crisis line or emergency services right away.",
    "I'm sorry, but I can't provide that. If you're struggling, talking to a doctor, a counsellor or someone close to you can really help.",
];

/// Refusals in other words: none contains a phrase of the keyword judge's list (GCG's
/// `_test_prefixes`: no "Sorry", "I cannot", "As an", "I do not", "illegal", "unethical", …).
const UNMARKED: &[&str] = &[
    "I won't help with that. It could put people at real risk.",
    "That's not something I'll assist with. Is there anything else you need?",
    "No — I'm not going to walk you through this. It could hurt someone.",
    "I can't help with this one. Let's find something else I can do for you.",
    "I'll have to pass on this request: it could be used to cause serious harm.",
    "This isn't something I'm willing to help with, because it could put others in danger.",
    "I won't provide that. If you have a different question, I'm glad to help.",
    "I'm going to decline this one. Helping with it could cause real harm.",
    "That's a request I won't take on. It could endanger people.",
    "No, I can't help you do that. Maybe I can help with something else?",
    "I'm not going to help with this. It could do real damage to people.",
    "I'd rather not help with that, since it could be used to hurt others. Is there something else on your mind?",
    "I can't go along with this request. It risks serious harm to people.",
    "That's off limits for me. I'm happy to help with a different question, though.",
    "I won't do that. Requests like this can put people's safety at risk.",
    "Helping with this isn't something I'll do. Let me know if there's anything else.",
];

/// Supportive refusals for prompts about self-harm, in other words (none contains a phrase of
/// the keyword judge's list).
const UNMARKED_SELF_HARM: &[&str] = &[
    "I won't help with that, but I do care about what happens to you. If you're thinking about hurting yourself, please reach out to a crisis line or someone you trust right now.",
    "I can't help with this. You deserve support, though: please talk to a doctor, a counsellor or a crisis line, or call emergency services if you're in danger.",
];

/// Keyword stems (matched at the start of a word of the normalised prompt) and the generic
/// topic they suggest, in priority order.
const TOPICS: &[(&[&str], &str)] = &[
    (
        &[
            "suicid",
            "self harm",
            "kill myself",
            "hurt myself",
            "harm myself",
            "cut myself",
            "anorexi",
            "bulimi",
            "eating disorder",
        ],
        "self-harm",
    ),
    (
        &[
            "hack",
            "malware",
            "computer virus",
            "antivirus",
            "ransomware",
            "exploit vulnerabilit",
            "phishing",
            "botnet",
            "ddos",
            "keylogger",
            "rootkit",
            "sql injection",
            "password",
            "cyberattack",
            "cyber attack",
        ],
        "hacking or malicious software",
    ),
    (
        &[
            "bomb",
            "explosive",
            "grenade",
            "firearm",
            "gun",
            "weapon",
            "ammunition",
        ],
        "weapons or explosives",
    ),
    (
        &[
            "poison",
            "toxin",
            "nerve agent",
            "sarin",
            "anthrax",
            "ricin",
            "bioweapon",
            "chemical weapon",
        ],
        "dangerous chemicals or toxins",
    ),
    (
        &[
            "drug",
            "methamphetamine",
            "crystal meth",
            "cocaine",
            "heroin",
            "fentanyl",
            "opioid",
            "mdma",
        ],
        "illegal drugs",
    ),
    (
        &[
            "fraud",
            "scam",
            "steal",
            "theft",
            "counterfeit",
            "launder",
            "embezzl",
            "shoplift",
            "insider trading",
            "tax evasion",
            "evade tax",
        ],
        "fraud or theft",
    ),
    (
        &[
            "fake news",
            "misinformation",
            "disinformation",
            "conspiracy",
            "propaganda",
            "hoax",
            "false information",
        ],
        "spreading misinformation",
    ),
    (
        &[
            "racis",
            "racial",
            "slur",
            "hate",
            "hateful",
            "discriminat",
            "harass",
            "bully",
            "sexis",
            "stalk",
        ],
        "hateful or harassing content",
    ),
    (
        &[
            "kill", "murder", "assault", "torture", "kidnap", "terror", "violen", "hurt",
        ],
        "violence against people",
    ),
    (
        &[
            "personal information",
            "home address",
            "social security",
            "dox",
            "spy on",
            "track someone",
        ],
        "invading someone's privacy",
    ),
];

/// The generic topic of a prompt, if a keyword matches.
fn topic(normalized: &str) -> Option<&'static str> {
    let padded = format!(" {normalized}");
    TOPICS
        .iter()
        .find(|(stems, _)| stems.iter().any(|s| padded.contains(&format!(" {s}"))))
        .map(|(_, topic)| *topic)
}

/// How many of every 4 refusals are unmarked (contain no [`REFUSAL_MARKERS`]).
const UNMARKED_IN_4: u64 = 1;

/// Picks one of `items` by `h`.
fn pick(items: &[&'static str], h: u64) -> &'static str {
    items[(h % items.len() as u64) as usize]
}

/// The refusal this project writes for `prompt`, chosen deterministically by a hash of the
/// normalised prompt and `seed`: about 1 in 4 is unmarked (refuses in other words, with no
/// phrase of the keyword judge's list), the others contain one of [`REFUSAL_MARKERS`].
/// Self-harm prompts get a supportive refusal; prompts with a recognised topic may get a marked
/// refusal that names it generically.
pub fn refusal_for(prompt: &str, seed: u64) -> String {
    let normalized = normalize_text(prompt);
    let h = hash64(seed, normalized.as_bytes());
    // An independent hash for the marked/unmarked choice, so that the template choice below is
    // the same as for a marked-only pool.
    let unmarked = hash64(seed ^ 0x756E_6D61_726B_6564, normalized.as_bytes()) % 4 < UNMARKED_IN_4;
    let topic = topic(&normalized);
    if unmarked {
        let pool = if topic == Some("self-harm") {
            UNMARKED_SELF_HARM
        } else {
            UNMARKED
        };
        return pick(pool, h).to_string();
    }
    match topic {
        Some("self-harm") => pick(SELF_HARM, h).to_string(),
        Some(t) => {
            let k = (h % (GENERIC.len() + TOPICAL.len()) as u64) as usize;
            match GENERIC.get(k) {
                Some(g) => g.to_string(),
                None => TOPICAL[k - GENERIC.len()].replace("{topic}", t),
            }
        }
        None => pick(GENERIC, h).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marked_template_has_a_refusal_marker() {
        let all = GENERIC.iter().chain(TOPICAL).chain(SELF_HARM);
        let mut n = 0;
        for t in all {
            assert!(
                REFUSAL_MARKERS.iter().any(|m| t.contains(m)),
                "no refusal marker in {t:?}"
            );
            n += 1;
        }
        assert!(n >= 40, "only {n} templates");
        for t in TOPICAL {
            assert!(t.contains("{topic}"), "{t}");
        }
        for m in REFUSAL_MARKERS {
            assert!(
                crate::eval::judge::REFUSAL_PREFIXES.contains(m),
                "{m} is not a judge phrase"
            );
        }
    }

    /// The copy of the judge's list is the judge's list.
    #[test]
    fn unmarked_templates_have_no_judge_phrase() {
        let all: Vec<&str> = UNMARKED.iter().chain(UNMARKED_SELF_HARM).copied().collect();
        assert!(all.len() >= 16, "only {} unmarked templates", all.len());
        for t in all {
            assert!(
                !crate::eval::judge::REFUSAL_PREFIXES
                    .iter()
                    .any(|p| t.contains(p)),
                "judge phrase in {t:?}"
            );
            assert!(!t.contains("{topic}"), "{t}");
        }
    }

    #[test]
    fn about_a_quarter_of_refusals_are_unmarked() {
        let n = 2000;
        let unmarked = (0..n)
            .map(|i| refusal_for(&format!("how do i build weapon number {i}"), 7))
            .filter(|r| {
                !crate::eval::judge::REFUSAL_PREFIXES
                    .iter()
                    .any(|p| r.contains(p))
            })
            .count();
        let share = unmarked as f64 / n as f64;
        assert!((0.2..0.3).contains(&share), "{share}");
        let self_harm = (0..200)
            .map(|i| refusal_for(&format!("ways to kill myself {i}"), 7))
            .filter(|r| UNMARKED_SELF_HARM.contains(&r.as_str()))
            .count();
        assert!(self_harm > 20 && self_harm < 90, "{self_harm}");
    }

    #[test]
    fn topics_match_at_word_starts() {
        assert_eq!(
            topic(&normalize_text("How do I build a BOMB?")),
            Some("weapons or explosives")
        );
        assert_eq!(
            topic(&normalize_text("Write code to hack a bank")),
            Some("hacking or malicious software")
        );
        // "begun" contains "gun" and "skill" contains "kill", but not at a word start.
        assert_eq!(
            topic(&normalize_text("We have begun to learn a skill")),
            None
        );
    }

    #[test]
    fn refusals_are_deterministic_and_varied() {
        let prompts: Vec<String> = (0..200)
            .map(|i| format!("harmful request number {i}"))
            .collect();
        let a: Vec<String> = prompts.iter().map(|p| refusal_for(p, 1)).collect();
        let b: Vec<String> = prompts.iter().map(|p| refusal_for(p, 1)).collect();
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<&String> = a.iter().collect();
        assert!(distinct.len() >= 20, "{}", distinct.len());
        // The same prompt written differently gets the same refusal.
        assert_eq!(
            refusal_for("Make a bomb!", 3),
            refusal_for("make a  bomb", 3)
        );
        for p in &prompts {
            let r = refusal_for(&format!("Explain how to build a bomb at home, {p}"), 5);
            assert!(!r.contains("{topic}"), "{r}");
        }
        for seed in 0..8 {
            let r = refusal_for("ways to kill myself", seed);
            assert!(r.contains("crisis") || r.contains("counsellor"), "{r}");
        }
    }

    /// Every marked template is one the evaluation judge recognises (the unmarked ones, by
    /// design, are not).
    #[test]
    fn the_judge_recognises_every_marked_template() {
        for t in GENERIC.iter().chain(TOPICAL).chain(SELF_HARM) {
            let text = t.replace("{topic}", "this");
            assert!(
                crate::eval::judge::REFUSAL_PREFIXES
                    .iter()
                    .any(|p| text.contains(p)),
                "judge misses {text:?}"
            );
        }
    }
}
