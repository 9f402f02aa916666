/// A device that claims a range of port I/O or MMIO addresses.
///
/// `offset` is relative to the start of the range the device was registered at. The data
/// slice is as wide as the guest's access (1, 2, 4 or 8 bytes). Implementations must accept
/// any offset and width a guest can produce: a hostile guest chooses both.
pub trait BusDevice: Send {
    /// Fills `data` with the value the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles the guest writing `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
