// A stand-in for a package the npm registry these tests install from does not have. vhd-lib
// depends on it, but not on the path the tests use (parseVhdStream): loading it is an error.
throw new Error(`${require('./package.json').name} is not installed: only vhd-lib's parseVhdStream is`)
