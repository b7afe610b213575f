//! A customer's contact points, normalised so that two spellings of one phone
//! or email compare equal: phones in E.164 (`+77011234567`), emails lower-cased.

use std::fmt;

/// A phone number in E.164 form. `Debug` masks it; [`Phone::as_e164`] gives it whole.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Phone(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("a phone number needs 10 to 15 digits, this one has {0}")]
    Length(usize),
    #[error("a phone number may hold only digits, spaces, +, -, (, ), and dots")]
    Characters,
}

impl Phone {
    /// Parses the spellings seen in Kazakhstan and Russia: `+7 701 123-45-67`,
    /// `87011234567`, `77011234567`, `7011234567` (10 digits: +7 assumed), and any
    /// other international number written with a leading `+`.
    pub fn parse(input: &str) -> Result<Phone, PhoneError> {
        let trimmed = input.trim();
        if !trimmed
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '+' | '-' | '(' | ')' | '.'))
        {
            return Err(PhoneError::Characters);
        }
        let international = trimmed.starts_with('+');
        let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
        let e164 = match (international, digits.len()) {
            (false, 10) => format!("+7{digits}"),
            (false, 11) if digits.starts_with('8') || digits.starts_with('7') => {
                format!("+7{}", &digits[1..])
            }
            (true, 10..=15) => format!("+{digits}"),
            (false, n) | (true, n) => return Err(PhoneError::Length(n)),
        };
        Ok(Phone(e164))
    }

    pub fn as_e164(&self) -> &str {
        &self.0
    }

    /// The digits after the country code `7` for +7 numbers (what amoCRM's
    /// full-text search finds best), else all digits.
    pub fn national_digits(&self) -> &str {
        self.0.strip_prefix("+7").unwrap_or(&self.0[1..])
    }

    /// The masked form for logs.
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phone({})", self.masked())
    }
}

impl fmt::Display for Phone {
    /// Masked: a phone is never printed whole by accident.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Masks any phone-like text for logs: keeps the country/operator prefix (at
/// most 3 digits, fewer for short numbers) and the last 2 digits, never more
/// than half; every other digit becomes `*`; other characters stay.
///
/// `+77011234567` → `+770******67`.
pub fn mask_phone(phone: &str) -> String {
    let digits = phone.chars().filter(char::is_ascii_digit).count();
    if digits <= 4 {
        return phone
            .chars()
            .map(|c| if c.is_ascii_digit() { '*' } else { c })
            .collect();
    }
    let keep_head = 3.min((digits / 2).saturating_sub(2));
    let mut seen = 0;
    phone
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen <= keep_head || seen > digits - 2 {
                    c
                } else {
                    '*'
                }
            } else {
                c
            }
        })
        .collect()
}

/// An email address, trimmed and lower-cased.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Email(String);

impl Email {
    /// `None` unless it looks like `local@domain.tld`.
    pub fn parse(input: &str) -> Option<Email> {
        let value = input.trim().to_lowercase();
        let (local, domain) = value.split_once('@')?;
        if local.is_empty() || !domain.contains('.') || value.contains(char::is_whitespace) {
            return None;
        }
        Some(Email(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (local, domain) = self.0.split_once('@').unwrap_or((&self.0, ""));
        write!(
            f,
            "Email({}***@{domain})",
            local.chars().next().unwrap_or('*')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kazakh_spellings_normalise_to_one_e164() {
        for spelling in [
            "+7 701 123-45-67",
            "87011234567",
            "77011234567",
            "7011234567",
            "8 (701) 123 45 67",
        ] {
            assert_eq!(
                Phone::parse(spelling).unwrap().as_e164(),
                "+77011234567",
                "{spelling}"
            );
        }
        assert_eq!(
            Phone::parse("+998 90 123 45 67").unwrap().as_e164(),
            "+998901234567"
        );
        assert_eq!(
            Phone::parse("+77011234567").unwrap().national_digits(),
            "7011234567"
        );
    }

    #[test]
    fn rejects_what_is_not_a_phone() {
        assert_eq!(Phone::parse("12345"), Err(PhoneError::Length(5)));
        assert_eq!(Phone::parse("call me"), Err(PhoneError::Characters));
        assert_eq!(Phone::parse("97011234567"), Err(PhoneError::Length(11)));
    }

    #[test]
    fn debug_and_display_mask_the_number() {
        let phone = Phone::parse("+77011234567").unwrap();
        assert_eq!(format!("{phone}"), "+770******67");
        assert!(!format!("{phone:?}").contains("1234567"));
    }

    #[test]
    fn emails_compare_case_insensitively() {
        assert_eq!(
            Email::parse(" Ivan@Example.KZ "),
            Email::parse("ivan@example.kz")
        );
        assert_eq!(Email::parse("no-at-sign"), None);
    }

    proptest! {
        #[test]
        fn every_accepted_spelling_is_stable_e164(national in "[0-9]{10}", prefix in prop::sample::select(vec!["", "8", "7", "+7", "+7 ", "8 ("])) {
            let phone = Phone::parse(&format!("{prefix}{national}")).unwrap();
            prop_assert_eq!(phone.as_e164(), format!("+7{national}"));
            // Parsing the normal form again changes nothing.
            prop_assert_eq!(Phone::parse(phone.as_e164()).unwrap(), phone.clone());
        }

        #[test]
        fn parse_never_panics(input in ".{0,40}") {
            let _ = Phone::parse(&input);
            let _ = Email::parse(&input);
        }
    }
}
