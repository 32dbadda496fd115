//! The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data), showing the host's
//! UTC time in BCD, 24-hour mode, as a PC BIOS leaves it.

use crate::BusDevice;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
/// Bit 7 of the index port masks NMIs; it is not part of the register number.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate, no update in progress.
const STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B: u8 = 0x02;
/// Valid RAM and time: the battery is good.
const STATUS_D: u8 = 0x80;

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub weekday: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl DateTime {
    /// Converts seconds since the Unix epoch (civil-from-days, proleptic Gregorian).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year: year as u32,
            month: month as u32,
            day: day as u32,
            // 1970-01-01 was a Thursday; the RTC numbers Sunday as 1.
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
        }
    }
}

fn bcd(value: u32) -> u8 {
    let v = value % 100;
    ((v / 10) << 4 | (v % 10)) as u8
}

/// The RTC. `now` returns seconds since the Unix epoch; it is the host clock outside tests.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: Box<dyn Fn() -> i64 + Send>,
}

impl Cmos {
    pub fn new(now: Box<dyn Fn() -> i64 + Send>) -> Self {
        Self { index: 0, nvram: [0; 128], now }
    }

    /// The index register and NVRAM, for snapshots (the clock is the host's).
    pub fn save(&self) -> (u8, Vec<u8>) {
        (self.index, self.nvram.to_vec())
    }

    pub fn restore(&mut self, index: u8, nvram: &[u8]) {
        // A snapshot file is untrusted: an index past the NVRAM must not survive into port 0x71.
        self.index = index & INDEX_MASK;
        let n = nvram.len().min(self.nvram.len());
        self.nvram[..n].copy_from_slice(&nvram[..n]);
    }

    /// An RTC on the host's clock.
    pub fn with_host_clock() -> Self {
        Self::new(Box::new(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
        }))
    }

    fn register(&self, index: u8) -> u8 {
        let t = || DateTime::from_unix((self.now)());
        match index {
            REG_SECONDS => bcd(t().second),
            REG_MINUTES => bcd(t().minute),
            REG_HOURS => bcd(t().hour),
            REG_WEEKDAY => bcd(t().weekday),
            REG_DAY => bcd(t().day),
            REG_MONTH => bcd(t().month),
            REG_YEAR => bcd(t().year % 100),
            REG_CENTURY => bcd(t().year / 100),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            other => self.nvram[usize::from(other & INDEX_MASK)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            // The clock follows the host; only plain NVRAM bytes are writable.
            DATA_OFFSET if !(REG_SECONDS..=REG_STATUS_D).contains(&self.index) && self.index != REG_CENTURY => {
                self.nvram[usize::from(self.index)] = value;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_reg(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(INDEX_OFFSET, &[index | 0x80]);
        let mut b = [0];
        cmos.read(DATA_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime { year: 1970, month: 1, day: 1, weekday: 5, hour: 0, minute: 0, second: 0 }
        );
        // 2026-11-25 09:45:30 UTC, a Wednesday.
        assert_eq!(
            DateTime::from_unix(1_795_599_930),
            DateTime { year: 2026, month: 11, day: 25, weekday: 4, hour: 9, minute: 45, second: 30 }
        );
        // 2000-02-29, a leap day on a Tuesday.
        let leap = DateTime::from_unix(951_782_400);
        assert_eq!((leap.year, leap.month, leap.day, leap.weekday), (2000, 2, 29, 3));
    }

    #[test]
    fn registers_show_the_clock_in_bcd() {
        let mut cmos = Cmos::new(Box::new(|| 1_795_599_930));
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0x30);
        assert_eq!(read_reg(&mut cmos, REG_MINUTES), 0x45);
        assert_eq!(read_reg(&mut cmos, REG_HOURS), 0x09);
        assert_eq!(read_reg(&mut cmos, REG_DAY), 0x25);
        assert_eq!(read_reg(&mut cmos, REG_WEEKDAY), 0x04);
        assert_eq!(read_reg(&mut cmos, REG_MONTH), 0x11);
        assert_eq!(read_reg(&mut cmos, REG_YEAR), 0x26);
        assert_eq!(read_reg(&mut cmos, REG_CENTURY), 0x20);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(read_reg(&mut cmos, REG_STATUS_B), STATUS_B);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_D), STATUS_D);
    }

    #[test]
    fn nvram_is_writable_but_the_clock_is_not() {
        let mut cmos = Cmos::new(Box::new(|| 0));
        cmos.write(INDEX_OFFSET, &[0x40]);
        cmos.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(read_reg(&mut cmos, 0x40), 0x5a);
        cmos.write(INDEX_OFFSET, &[REG_YEAR]);
        cmos.write(DATA_OFFSET, &[0x99]);
        assert_eq!(read_reg(&mut cmos, REG_YEAR), 0x70);
    }

    #[test]
    fn a_restored_index_is_masked_like_a_written_one() {
        let mut cmos = Cmos::new(Box::new(|| 0));
        cmos.restore(0xff, &[0; 128]);
        // Before the fix this wrote nvram[255]: a panic (an abort in release builds).
        cmos.write(DATA_OFFSET, &[0x42]);
        assert_eq!(cmos.save().0, 0x7f);
        assert_eq!(read_reg(&mut cmos, 0x7f), 0x42);
    }
}
