//! Password rules, each with an error that says which rule failed.

/// Passwords every list of leaked passwords starts with (lower-cased). A password
/// whose lower-cased form is one of these, or one of these followed by digits or
/// punctuation, is refused.
const COMMON: &[&str] = &[
    "123456",
    "password",
    "12345678",
    "qwerty",
    "123456789",
    "12345",
    "1234",
    "111111",
    "1234567",
    "dragon",
    "123123",
    "baseball",
    "abc123",
    "football",
    "monkey",
    "letmein",
    "696969",
    "shadow",
    "master",
    "666666",
    "qwertyuiop",
    "123321",
    "mustang",
    "1234567890",
    "michael",
    "654321",
    "superman",
    "1qaz2wsx",
    "7777777",
    "121212",
    "000000",
    "qazwsx",
    "123qwe",
    "killer",
    "trustno1",
    "jordan",
    "jennifer",
    "zxcvbnm",
    "asdfgh",
    "hunter",
    "buster",
    "soccer",
    "harley",
    "batman",
    "andrew",
    "tigger",
    "sunshine",
    "iloveyou",
    "2000",
    "charlie",
    "robert",
    "thomas",
    "hockey",
    "ranger",
    "daniel",
    "starwars",
    "klaster",
    "112233",
    "george",
    "computer",
    "michelle",
    "jessica",
    "pepper",
    "1111",
    "zxcvbn",
    "555555",
    "11111111",
    "131313",
    "freedom",
    "777777",
    "pass",
    "maggie",
    "159753",
    "aaaaaa",
    "ginger",
    "princess",
    "joshua",
    "cheese",
    "amanda",
    "summer",
    "love",
    "ashley",
    "nicole",
    "chelsea",
    "biteme",
    "matthew",
    "access",
    "yankees",
    "987654321",
    "dallas",
    "austin",
    "thunder",
    "taylor",
    "matrix",
    "admin",
    "welcome",
    "passw0rd",
    "p@ssw0rd",
    "p@ssword",
    "changeme",
    "secret",
    "root",
    "toor",
    "administrator",
    "qwerty123",
    "password1",
    "welcome1",
    "letmein1",
    "abcdef",
    "abcd1234",
    "qwe123",
    "portswitch",
    "default",
    "guest",
    "login",
    "test",
    "test123",
    "temp",
    "temp123",
];

/// Rules for new passwords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Fewest characters.
    pub length_min: usize,
    /// Fewest character classes (lower case, upper case, digits, other).
    pub classes_min: u8,
    /// Refuse passwords from the built-in list of common ones.
    pub reject_common: bool,
}

/// Default fewest characters.
pub const PASSWORD_LENGTH_MIN: usize = 12;
/// Longest password accepted (PBKDF2 cost does not depend on it, but storage and
/// messages are bounded).
pub const PASSWORD_BYTES_MAX: usize = 256;

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy {
            length_min: PASSWORD_LENGTH_MIN,
            classes_min: 3,
            reject_common: true,
        }
    }
}

/// Which rule a password broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("password is shorter than {min} characters")]
    TooShort { min: usize },
    #[error("password is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("password uses {found} of the character classes (lower, upper, digit, other); at least {min} are required")]
    TooFewClasses { min: u8, found: u8 },
    #[error("password is a commonly used one")]
    Common,
    #[error("password contains the user name")]
    ContainsUsername,
}

impl PasswordPolicy {
    /// Checks `password` for `user`, naming the first rule it breaks.
    pub fn check(&self, user: &str, password: &str) -> Result<(), PolicyError> {
        if password.len() > PASSWORD_BYTES_MAX {
            return Err(PolicyError::TooLong {
                max: PASSWORD_BYTES_MAX,
            });
        }
        if password.chars().count() < self.length_min {
            return Err(PolicyError::TooShort {
                min: self.length_min,
            });
        }
        let has = |f: fn(&char) -> bool| password.chars().any(|c| f(&c)) as u8;
        let found = has(|c| c.is_lowercase())
            + has(|c| c.is_uppercase())
            + has(|c| c.is_ascii_digit())
            + has(|c| !c.is_alphanumeric());
        if found < self.classes_min {
            return Err(PolicyError::TooFewClasses {
                min: self.classes_min,
                found,
            });
        }
        let lower = password.to_lowercase();
        if !user.is_empty() && lower.contains(&user.to_lowercase()) {
            return Err(PolicyError::ContainsUsername);
        }
        if self.reject_common {
            let stem =
                lower.trim_end_matches(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation());
            let stem =
                stem.trim_start_matches(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation());
            if COMMON.contains(&lower.as_str()) || COMMON.contains(&stem) {
                return Err(PolicyError::Common);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_names_itself() {
        let p = PasswordPolicy::default();
        assert_eq!(
            p.check("alice", "Sh0rt!"),
            Err(PolicyError::TooShort { min: 12 })
        );
        assert_eq!(
            p.check("alice", "alllowercaseletters"),
            Err(PolicyError::TooFewClasses { min: 3, found: 1 })
        );
        assert_eq!(
            p.check("alice", "Alice-is-great-42"),
            Err(PolicyError::ContainsUsername)
        );
        assert_eq!(p.check("bob", "Password123!!!!"), Err(PolicyError::Common));
        assert_eq!(p.check("bob", "!!Qwerty123456"), Err(PolicyError::Common));
        assert_eq!(
            p.check("bob", &"Aa1!".repeat(70)),
            Err(PolicyError::TooLong { max: 256 })
        );
        assert_eq!(p.check("bob", "Tulip-Orbit-93"), Ok(()));
    }

    #[test]
    fn the_policy_is_configurable() {
        let lax = PasswordPolicy {
            length_min: 4,
            classes_min: 1,
            reject_common: false,
        };
        assert_eq!(lax.check("u", "password"), Ok(()));
    }
}
