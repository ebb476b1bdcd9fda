//! The lexer: source text to tokens with byte spans, one token at a time (the parser
//! pulls; nothing is buffered, so garbage input costs no memory beyond one token).
//!
//! Literals follow CEL: `123`, `0x7f`, `1.5`, `1e-3`; strings in `"…"` or `'…'` with C
//! escapes (`\n`, `\xHH`, `\uHHHH`, `\UHHHHHHHH`, octal `\ooo`); raw strings `r"…"` with
//! no escapes (handy for regexes); bytes `b"…"`, where `\x` and octal escapes are raw
//! bytes. `//` starts a comment to the end of the line.

use crate::error::{CompileError, CompileErrorKind as K, Span};

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok<'s> {
    /// Unsigned: the parser applies a preceding `-`, so that `-9223372036854775808` works.
    Int(u64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Ident(&'s str),
    True,
    False,
    Null,
    In,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Bang,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    AndAnd,
    OrOr,
    Question,
    Colon,
    Dot,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Eof,
}

impl Tok<'_> {
    /// How the token reads in an error message.
    pub(crate) fn describe(&self) -> String {
        let s = match self {
            Tok::Int(_) | Tok::Float(_) => "a number",
            Tok::Str(_) => "a string",
            Tok::Bytes(_) => "a bytes literal",
            Tok::Ident(name) => return format!("`{name}`"),
            Tok::True => "`true`",
            Tok::False => "`false`",
            Tok::Null => "`null`",
            Tok::In => "`in`",
            Tok::Plus => "`+`",
            Tok::Minus => "`-`",
            Tok::Star => "`*`",
            Tok::Slash => "`/`",
            Tok::Percent => "`%`",
            Tok::Bang => "`!`",
            Tok::EqEq => "`==`",
            Tok::NotEq => "`!=`",
            Tok::Lt => "`<`",
            Tok::Le => "`<=`",
            Tok::Gt => "`>`",
            Tok::Ge => "`>=`",
            Tok::AndAnd => "`&&`",
            Tok::OrOr => "`||`",
            Tok::Question => "`?`",
            Tok::Colon => "`:`",
            Tok::Dot => "`.`",
            Tok::Comma => "`,`",
            Tok::LParen => "`(`",
            Tok::RParen => "`)`",
            Tok::LBracket => "`[`",
            Tok::RBracket => "`]`",
            Tok::LBrace => "`{`",
            Tok::RBrace => "`}`",
            Tok::Eof => "end of input",
        };
        s.to_owned()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Token<'s> {
    pub tok: Tok<'s>,
    pub span: Span,
}

pub(crate) struct Lexer<'s> {
    src: &'s str,
    pos: usize,
}

/// Spans are `u32`; the caller has already refused sources longer than that.
fn span(start: usize, end: usize) -> Span {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Span::new(clamp(start), clamp(end))
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_ident_continue(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl<'s> Lexer<'s> {
    pub(crate) fn new(src: &'s str) -> Lexer<'s> {
        Lexer { src, pos: 0 }
    }

    fn peek_byte(&self, ahead: usize) -> Option<u8> {
        self.src.as_bytes().get(self.pos + ahead).copied()
    }

    fn err(&self, kind: K, start: usize) -> CompileError {
        CompileError::new(
            kind,
            span(start, self.pos.max(start + 1).min(self.src.len())),
        )
    }

    fn skip_trivia(&mut self) {
        loop {
            match self.peek_byte(0) {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.pos += 1,
                Some(b'/') if self.peek_byte(1) == Some(b'/') => {
                    while !matches!(self.peek_byte(0), None | Some(b'\n')) {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    pub(crate) fn next_token(&mut self) -> Result<Token<'s>, CompileError> {
        self.skip_trivia();
        let start = self.pos;
        let Some(b) = self.peek_byte(0) else {
            return Ok(Token {
                tok: Tok::Eof,
                span: span(start, start),
            });
        };
        let tok = match b {
            b'0'..=b'9' => self.number(start)?,
            b'.' if self.peek_byte(1).is_some_and(|c| c.is_ascii_digit()) => self.number(start)?,
            b'"' | b'\'' => self.string(start, false, false)?,
            _ if is_ident_start(b) => {
                if let Some((raw, bytes, prefix_len)) = self.string_prefix() {
                    self.pos += prefix_len;
                    self.string(start, raw, bytes)?
                } else {
                    self.ident(start)
                }
            }
            _ => self.punct(start)?,
        };
        Ok(Token {
            tok,
            span: span(start, self.pos),
        })
    }

    /// A string prefix (`r`, `b`, `br`, `rb`, any case) directly followed by a quote.
    fn string_prefix(&self) -> Option<(bool, bool, usize)> {
        let is_quote = |b: Option<u8>| matches!(b, Some(b'"' | b'\''));
        let lower = |i: usize| self.peek_byte(i).map(|b| b.to_ascii_lowercase());
        match (lower(0), lower(1)) {
            (Some(b'r'), _) if is_quote(self.peek_byte(1)) => Some((true, false, 1)),
            (Some(b'b'), _) if is_quote(self.peek_byte(1)) => Some((false, true, 1)),
            (Some(b'r'), Some(b'b')) | (Some(b'b'), Some(b'r')) if is_quote(self.peek_byte(2)) => {
                Some((true, true, 2))
            }
            _ => None,
        }
    }

    fn ident(&mut self, start: usize) -> Tok<'s> {
        while self.peek_byte(0).is_some_and(is_ident_continue) {
            self.pos += 1;
        }
        match &self.src[start..self.pos] {
            "true" => Tok::True,
            "false" => Tok::False,
            "null" => Tok::Null,
            "in" => Tok::In,
            name => Tok::Ident(name),
        }
    }

    fn digits(&mut self, radix: u32) -> usize {
        let from = self.pos;
        while self
            .peek_byte(0)
            .is_some_and(|c| char::from(c).is_digit(radix))
        {
            self.pos += 1;
        }
        self.pos - from
    }

    fn number(&mut self, start: usize) -> Result<Tok<'s>, CompileError> {
        let invalid = |lexer: &Self, why: &str| {
            lexer.err(
                K::InvalidNumber(format!("{}: {why}", &lexer.src[start..lexer.pos])),
                start,
            )
        };
        if self.peek_byte(0) == Some(b'0') && matches!(self.peek_byte(1), Some(b'x' | b'X')) {
            self.pos += 2;
            if self.digits(16) == 0 {
                return Err(invalid(self, "no hex digits"));
            }
            let tok = u64::from_str_radix(&self.src[start + 2..self.pos], 16)
                .map(Tok::Int)
                .map_err(|_| invalid(self, "too large"))?;
            return self.end_number(start, tok);
        }
        let mut is_float = false;
        self.digits(10);
        if self.peek_byte(0) == Some(b'.') && self.peek_byte(1).is_some_and(|c| c.is_ascii_digit())
        {
            self.pos += 1;
            self.digits(10);
            is_float = true;
        }
        if matches!(self.peek_byte(0), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek_byte(0), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits(10) == 0 {
                return Err(invalid(self, "no exponent digits"));
            }
            is_float = true;
        }
        let text = &self.src[start..self.pos];
        let tok = if is_float {
            match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Tok::Float(f),
                _ => return Err(invalid(self, "out of range")),
            }
        } else {
            text.parse::<u64>()
                .map(Tok::Int)
                .map_err(|_| invalid(self, "too large"))?
        };
        self.end_number(start, tok)
    }

    /// A number runs into a letter (`1u`, `2abc`): refuse rather than split it in two.
    fn end_number(&mut self, start: usize, tok: Tok<'s>) -> Result<Tok<'s>, CompileError> {
        if self.peek_byte(0).is_some_and(is_ident_continue) {
            self.pos += 1;
            return Err(self.err(
                K::InvalidNumber(format!("{}: unexpected suffix", &self.src[start..self.pos])),
                start,
            ));
        }
        Ok(tok)
    }

    fn string(&mut self, start: usize, raw: bool, bytes: bool) -> Result<Tok<'s>, CompileError> {
        let Some(quote) = self.peek_byte(0) else {
            return Err(self.err(K::UnterminatedString, start));
        };
        self.pos += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.src[self.pos..].chars().next() else {
                return Err(self.err(K::UnterminatedString, start));
            };
            match c {
                '\n' | '\r' => return Err(self.err(K::UnterminatedString, start)),
                _ if c as u32 == u32::from(quote) => {
                    self.pos += 1;
                    break;
                }
                '\\' if !raw => self.escape(&mut out, bytes)?,
                c => {
                    self.pos += c.len_utf8();
                    push_char(&mut out, c);
                }
            }
        }
        if bytes {
            Ok(Tok::Bytes(out))
        } else {
            // Only whole characters and escapes decoded to characters were pushed.
            String::from_utf8(out)
                .map(Tok::Str)
                .map_err(|_| self.err(K::InvalidEscape("not UTF-8".into()), start))
        }
    }

    fn escape(&mut self, out: &mut Vec<u8>, bytes: bool) -> Result<(), CompileError> {
        let start = self.pos;
        self.pos += 1; // the backslash
        let Some(e) = self.src[self.pos..].chars().next() else {
            return Err(self.err(K::UnterminatedString, start));
        };
        self.pos += e.len_utf8();
        let simple = match e {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' | '\'' | '"' | '`' | '?' => Some(e as u8),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            return Ok(());
        }
        let (radix, len) = match e {
            'x' | 'X' => (16, 2),
            'u' => (16, 4),
            'U' => (16, 8),
            '0'..='3' => {
                self.pos -= 1; // the first octal digit is part of the number
                (8, 3)
            }
            _ => {
                return Err(self.err(K::InvalidEscape(format!("\\{e}")), start));
            }
        };
        let digits = self
            .src
            .get(self.pos..self.pos + len)
            .filter(|d| d.bytes().all(|c| char::from(c).is_digit(radix)));
        let Some(digits) = digits else {
            return Err(self.err(
                K::InvalidEscape(format!("\\{e}: expected {len} digits")),
                start,
            ));
        };
        self.pos += len;
        let code = u32::from_str_radix(digits, radix)
            .map_err(|_| self.err(K::InvalidEscape(digits.to_owned()), start))?;
        // In bytes literals \x and octal escapes are raw bytes; everywhere else an escape
        // names a code point.
        let raw_byte = bytes && matches!(e, 'x' | 'X' | '0'..='3');
        if raw_byte {
            // Two hex or three octal digits starting 0-3: at most 255.
            out.push(u8::try_from(code).unwrap_or(u8::MAX));
            return Ok(());
        }
        match char::from_u32(code) {
            Some(c) => {
                push_char(out, c);
                Ok(())
            }
            None => Err(self.err(
                K::InvalidEscape(format!("\\{e}{digits} is not a Unicode scalar value")),
                start,
            )),
        }
    }

    fn punct(&mut self, start: usize) -> Result<Tok<'s>, CompileError> {
        let two = |a: u8, b: u8| self.peek_byte(0) == Some(a) && self.peek_byte(1) == Some(b);
        let (tok, len) = if two(b'&', b'&') {
            (Tok::AndAnd, 2)
        } else if two(b'|', b'|') {
            (Tok::OrOr, 2)
        } else if two(b'=', b'=') {
            (Tok::EqEq, 2)
        } else if two(b'!', b'=') {
            (Tok::NotEq, 2)
        } else if two(b'<', b'=') {
            (Tok::Le, 2)
        } else if two(b'>', b'=') {
            (Tok::Ge, 2)
        } else {
            let tok = match self.peek_byte(0) {
                Some(b'+') => Tok::Plus,
                Some(b'-') => Tok::Minus,
                Some(b'*') => Tok::Star,
                Some(b'/') => Tok::Slash,
                Some(b'%') => Tok::Percent,
                Some(b'!') => Tok::Bang,
                Some(b'<') => Tok::Lt,
                Some(b'>') => Tok::Gt,
                Some(b'?') => Tok::Question,
                Some(b':') => Tok::Colon,
                Some(b'.') => Tok::Dot,
                Some(b',') => Tok::Comma,
                Some(b'(') => Tok::LParen,
                Some(b')') => Tok::RParen,
                Some(b'[') => Tok::LBracket,
                Some(b']') => Tok::RBracket,
                Some(b'{') => Tok::LBrace,
                Some(b'}') => Tok::RBrace,
                _ => {
                    let c = self.src[start..].chars().next().unwrap_or('\0');
                    self.pos += c.len_utf8().max(1);
                    return Err(self.err(K::UnexpectedChar(c), start));
                }
            };
            (tok, 1)
        };
        self.pos += len;
        Ok(tok)
    }
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(src: &str) -> Vec<Tok<'_>> {
        let mut lexer = Lexer::new(src);
        let mut out = Vec::new();
        loop {
            let t = lexer.next_token().expect("lexes");
            if t.tok == Tok::Eof {
                return out;
            }
            out.push(t.tok);
        }
    }

    fn lex_err(src: &str) -> CompileError {
        let mut lexer = Lexer::new(src);
        loop {
            match lexer.next_token() {
                Err(e) => return e,
                Ok(t) if t.tok == Tok::Eof => panic!("{src:?} lexed without error"),
                Ok(_) => {}
            }
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(
            toks("0 42 0x7F 1.5 1e3 2.5E-2 .5"),
            [
                Tok::Int(0),
                Tok::Int(42),
                Tok::Int(127),
                Tok::Float(1.5),
                Tok::Float(1000.0),
                Tok::Float(0.025),
                Tok::Float(0.5)
            ]
        );
        assert_eq!(toks("18446744073709551615"), [Tok::Int(u64::MAX)]);
        // `1.` followed by a name is a member access, not a float.
        assert_eq!(toks("1.x"), [Tok::Int(1), Tok::Dot, Tok::Ident("x")]);
        for bad in [
            "18446744073709551616",
            "0x",
            "1e",
            "1e+",
            "1e999",
            "1u",
            "2abc",
            "0x1g",
        ] {
            assert!(matches!(lex_err(bad).kind(), K::InvalidNumber(_)), "{bad}");
        }
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(
            toks(r#""a\n\t\\\"" 'it''s' "\x41\u00e9\U0001F600\101""#),
            [
                Tok::Str("a\n\t\\\"".into()),
                Tok::Str("it".into()),
                Tok::Str("s".into()),
                Tok::Str("Aé😀A".into())
            ]
        );
        assert_eq!(toks(r#"r"\d+\p{L}""#), [Tok::Str(r"\d+\p{L}".into())]);
        assert_eq!(
            toks(r#"b"\xff\377a\u00e9" B'x' rb"\x""#),
            [
                Tok::Bytes(vec![0xff, 0xff, b'a', 0xc3, 0xa9]),
                Tok::Bytes(b"x".to_vec()),
                Tok::Bytes(br"\x".to_vec())
            ]
        );
        assert_eq!(toks("\"äöü\""), [Tok::Str("äöü".into())]);
        assert_eq!(toks("r + b"), [Tok::Ident("r"), Tok::Plus, Tok::Ident("b")]);
        for bad in [
            r#""abc"#,
            "\"a\nb\"",
            r#""\q""#,
            r#""\x4""#,
            r#""\ud800""#,
            "\"\\",
        ] {
            let e = lex_err(bad);
            assert!(
                matches!(e.kind(), K::InvalidEscape(_) | K::UnterminatedString),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn punctuation_keywords_comments() {
        assert_eq!(
            toks("a.b && !c || d in e // trailing\n <= >= == != ? :"),
            [
                Tok::Ident("a"),
                Tok::Dot,
                Tok::Ident("b"),
                Tok::AndAnd,
                Tok::Bang,
                Tok::Ident("c"),
                Tok::OrOr,
                Tok::Ident("d"),
                Tok::In,
                Tok::Ident("e"),
                Tok::Le,
                Tok::Ge,
                Tok::EqEq,
                Tok::NotEq,
                Tok::Question,
                Tok::Colon
            ]
        );
        assert_eq!(toks("true false null"), [Tok::True, Tok::False, Tok::Null]);
        for bad in ["a & b", "a | b", "a = b", "#", "é"] {
            assert!(matches!(lex_err(bad).kind(), K::UnexpectedChar(_)), "{bad}");
        }
    }

    #[test]
    fn spans_are_byte_offsets() {
        let mut lexer = Lexer::new("  äb 'x'");
        let first = lexer.next_token();
        assert!(first.is_err(), "ä is not an identifier character");
        let mut lexer = Lexer::new("ab  'xé'");
        assert_eq!(lexer.next_token().map(|t| t.span), Ok(Span::new(0, 2)));
        assert_eq!(lexer.next_token().map(|t| t.span), Ok(Span::new(4, 9)));
    }
}
