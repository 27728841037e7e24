package qemu

// SetUnversioned makes guests started afterwards give the engine their RAM
// without the plugin's version words (see unversioned); it returns the
// previous setting.
func SetUnversioned(on bool) (was bool) {
	was, unversioned = unversioned, on
	return was
}
