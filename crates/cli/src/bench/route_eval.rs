//! The labelled evaluation set of `strata bench route`, built from real
//! text:
//!
//! - device commands: held-out sentences expanded from the Home Assistant
//!   intents (never seen by the intent head);
//! - fleet questions: held-out sentences expanded from Strata's own
//!   fleet-question templates (also never trained on);
//! - prompts with personal data: the customer-support templates of
//!   Microsoft's presidio-evaluator that carry an e-mail address, phone
//!   number, payment card, IBAN or social security number, filled from
//!   its FakeNameGenerator table (names, e-mails, phones) with card
//!   numbers, IBANs and SSNs drawn here so that they are valid (Luhn,
//!   mod-97);
//! - general prompts: the presidio-evaluator templates with no personal
//!   data (at most a country, city, organisation, year and the like).
//!
//! Templates with names or street addresses but none of the structured
//! identifiers above are left out: telling those apart needs a
//! named-entity model, which Strata's privacy classifier does not claim.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The class of an evaluation prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Class {
    /// A Home Assistant device command.
    Command,
    /// A question that needs fleet-wide data.
    Fleet,
    /// A prompt carrying personal data.
    Private,
    /// Anything else.
    General,
}

impl Class {
    pub(crate) const ALL: [Class; 4] =
        [Class::Command, Class::Fleet, Class::Private, Class::General];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Class::Command => "device command",
            Class::Fleet => "fleet question",
            Class::Private => "personal data",
            Class::General => "general",
        }
    }
}

/// One labelled prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Prompt {
    pub class: Class,
    pub text: String,
}

/// Placeholders whose values are personal data the router must keep.
const PRIVATE: &[&str] = &["email", "phone_number", "credit_card_number", "iban", "ssn"];
/// Placeholders that are not personal data.
const GENERAL: &[&str] = &[
    "country",
    "city",
    "organization",
    "job",
    "year",
    "day_of_week",
    "nationality",
    "nation_plural",
    "nation_woman",
    "url",
    "date_time",
    "state_abbr",
];

fn placeholders(template: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else {
            break;
        };
        out.insert(rest[start + 2..start + end].to_owned());
        rest = &rest[start + end + 2..];
    }
    out
}

/// A person from the FakeNameGenerator table.
struct Person {
    given: String,
    surname: String,
    street: String,
    city: String,
    zip: String,
    state: String,
    country: String,
    email: String,
    phone: String,
    birthday: String,
    age: String,
    job: String,
    company: String,
    domain: String,
    name_set: String,
    title: String,
}

fn people(csv: &str) -> Vec<Person> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches('\u{feff}')
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let idx = [
        "GivenName",
        "Surname",
        "StreetAddress",
        "City",
        "ZipCode",
        "State",
        "CountryFull",
        "EmailAddress",
        "TelephoneNumber",
        "TelephoneCountryCode",
        "Birthday",
        "Age",
        "Occupation",
        "Company",
        "Domain",
        "NameSet",
        "Title",
    ]
    .map(col);
    lines
        .filter_map(|line| {
            // The table has no quoted fields with commas in the columns used.
            let f: Vec<&str> = line.split(',').collect();
            let get = |i: Option<usize>| i.and_then(|i| f.get(i)).map(|s| (*s).to_owned());
            Some(Person {
                given: get(idx[0])?,
                surname: get(idx[1])?,
                street: get(idx[2])?,
                city: get(idx[3])?,
                zip: get(idx[4])?,
                state: get(idx[5])?,
                country: get(idx[6])?,
                email: get(idx[7])?,
                phone: format!("+{} {}", get(idx[9])?, get(idx[8])?),
                birthday: get(idx[10])?,
                age: get(idx[11])?,
                job: get(idx[12])?,
                company: get(idx[13])?,
                domain: get(idx[14])?,
                name_set: get(idx[15])?,
                title: get(idx[16])?,
            })
        })
        .filter(|p| p.email.contains('@'))
        .collect()
}

/// A 16-digit card number that passes the Luhn check, in groups of four.
fn card(rng: &mut ChaCha8Rng) -> String {
    let mut digits: Vec<u32> = vec![if rng.random_bool(0.5) { 4 } else { 5 }];
    while digits.len() < 15 {
        digits.push(rng.random_range(0..10));
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    digits.push((10 - sum % 10) % 10);
    let s: String = digits
        .iter()
        .map(|d| char::from_digit(*d, 10).unwrap_or('0'))
        .collect();
    if rng.random_bool(0.5) {
        s.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        s
    }
}

/// An IBAN with valid check digits (ISO 13616 mod 97).
fn iban(rng: &mut ChaCha8Rng) -> String {
    let (country, len) = [("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14)][rng.random_range(0..4)];
    let bban: String = (0..len)
        .map(|i| {
            // GB and NL start with a four-letter bank code.
            if (country == "GB" || country == "NL") && i < 4 {
                char::from(b'A' + rng.random_range(0..26u8))
            } else {
                char::from(b'0' + rng.random_range(0..10u8))
            }
        })
        .collect();
    let rearranged = format!("{bban}{country}00");
    let remainder = rearranged.chars().fold(0u64, |acc, c| {
        let v = c.to_digit(36).unwrap_or(0) as u64;
        if v >= 10 {
            (acc * 100 + v) % 97
        } else {
            (acc * 10 + v) % 97
        }
    });
    let check = 98 - remainder;
    let iban = format!("{country}{check:02}{bban}");
    iban.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn fill(template: &str, p: &Person, rng: &mut ChaCha8Rng) -> String {
    let mut out = template.replace("\\n", "\n");
    for ph in placeholders(template) {
        let value = match ph.as_str() {
            "email" => p.email.clone(),
            "phone_number" => p.phone.clone(),
            "credit_card_number" => card(rng),
            "iban" => iban(rng),
            "ssn" => format!(
                "{:03}-{:02}-{:04}",
                rng.random_range(100..666),
                rng.random_range(10..99),
                rng.random_range(1000..9999)
            ),
            "person" | "name" => format!("{} {}", p.given, p.surname),
            "name_female" | "name_male" => format!("{} {}", p.given, p.surname),
            "first_name" | "first_name_male" | "first_name_female" | "first_name_nonbinary" => {
                p.given.clone()
            }
            "last_name" | "last_name_male" | "last_name_female" => p.surname.clone(),
            "prefix" | "prefix_male" | "prefix_female" => p.title.clone(),
            "address" => format!("{}, {} {}", p.street, p.city, p.zip),
            "street_name" => p
                .street
                .split_once(' ')
                .map_or(p.street.clone(), |(_, s)| s.to_owned()),
            "building_number" => rng.random_range(1..400).to_string(),
            "secondary_address" => format!("Apt. {}", rng.random_range(1..60)),
            "city" => p.city.clone(),
            "country" => p.country.clone(),
            "postcode" | "zipcode" => p.zip.clone(),
            "state_abbr" => p.state.clone(),
            "organization" => p.company.clone(),
            "job" => p.job.to_lowercase(),
            "age" => p.age.clone(),
            "date_of_birth" => p.birthday.clone(),
            "year" => rng.random_range(1950..2025).to_string(),
            "day_of_week" => {
                ["Monday", "Tuesday", "Friday", "Sunday"][rng.random_range(0..4)].into()
            }
            "nationality" | "nation_woman" | "nation_plural" => p.name_set.clone(),
            "url" => format!("https://{}", p.domain.to_lowercase()),
            "date_time" => format!("March {}, 2019", rng.random_range(1..29)),
            "ip_address" => format!(
                "{}.{}.{}.{}",
                rng.random_range(11..200),
                rng.random_range(0..255),
                rng.random_range(0..255),
                rng.random_range(1..255)
            ),
            _ => "something".into(),
        };
        out = out.replace(&format!("{{{{{ph}}}}}"), &value);
    }
    out
}

/// Takes `n` items spread evenly over `items`.
fn spread<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    if items.is_empty() {
        return Vec::new();
    }
    let step = (items.len() as f64 / n as f64).max(1.0);
    (0..n.min(items.len()))
        .map(|i| items[((i as f64 * step) as usize).min(items.len() - 1)].clone())
        .collect()
}

/// Builds the set: `per_class` prompts of each class, from the assets.
pub(crate) fn build(assets: &Path, per_class: usize, seed: u64) -> anyhow::Result<Vec<Prompt>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let options = runtime::intents::ExpansionOptions::default();
    let ha_path = assets.join("home-assistant-intents/en.json");
    let ha = runtime::intents::load(&ha_path, &options)
        .with_context(|| format!("reading {} (run scripts/fetch-assets)", ha_path.display()))?;
    // The intent head's held-out split (train-intents' default 20 %).
    let (_, held_out) = ha.split(0.2);
    let commands: Vec<String> = held_out.iter().map(|e| e.text.clone()).collect();
    // More draws per template than training takes; the held-out split is
    // by a hash of the text, so none of these was trained on.
    let fleet = runtime::intents::expand(
        runtime::intents::FLEET_INTENTS_JSON,
        Path::new("fleet-intents.json"),
        &runtime::intents::ExpansionOptions {
            per_template: 24,
            per_intent: None,
            ..options.clone()
        },
    )?;
    let (_, fleet_held_out) = fleet.split(0.2);
    let fleet: Vec<String> = fleet_held_out.iter().map(|e| e.text.clone()).collect();

    let dir = assets.join("presidio-evaluator");
    let templates = std::fs::read_to_string(dir.join("templates.txt"))
        .with_context(|| format!("reading {} (run scripts/fetch-assets)", dir.display()))?;
    let csv = std::fs::read_to_string(dir.join("FakeNameGenerator.com_3000.csv"))
        .with_context(|| format!("reading {}", dir.display()))?;
    let people = people(&csv);
    anyhow::ensure!(
        !people.is_empty(),
        "no people in the FakeNameGenerator table"
    );
    let mut private_t = Vec::new();
    let mut general_t = Vec::new();
    for t in templates.lines().map(str::trim).filter(|t| !t.is_empty()) {
        let ph = placeholders(t);
        if ph.iter().any(|p| PRIVATE.contains(&p.as_str())) {
            private_t.push(t.to_owned());
        } else if ph.iter().all(|p| GENERAL.contains(&p.as_str())) {
            general_t.push(t.to_owned());
        }
    }
    let mut fill_n = |templates: &[String], n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let t = &templates[i % templates.len()];
                let p = &people[rng.random_range(0..people.len())];
                fill(t, p, &mut rng)
            })
            .collect()
    };
    let private = fill_n(&private_t, per_class);
    let general = fill_n(&general_t, per_class);
    let mut out = Vec::new();
    for (class, texts) in [
        (Class::Command, spread(&commands, per_class)),
        (Class::Fleet, spread(&fleet, per_class)),
        (Class::Private, private),
        (Class::General, general),
    ] {
        out.extend(texts.into_iter().map(|text| Prompt { class, text }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_cards_and_ibans_are_valid() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let policy = router::CompiledPolicy::new(router::Policy::default()).unwrap();
        for _ in 0..200 {
            let c = card(&mut rng);
            let found = policy
                .classifier()
                .classify(&format!("my card is {c} thanks"));
            assert!(
                found.iter().any(|d| d.name() == "payment_card"),
                "{c}: {found:?}"
            );
            let i = iban(&mut rng);
            let found = policy
                .classifier()
                .classify(&format!("pay into {i} please"));
            assert!(found.iter().any(|d| d.name() == "iban"), "{i}: {found:?}");
        }
    }

    #[test]
    fn placeholders_are_found() {
        let p = placeholders("card {{credit_card_number}} of {{person}} in {{city}}");
        assert_eq!(
            p.into_iter().collect::<Vec<_>>(),
            ["city", "credit_card_number", "person"]
        );
    }
}
