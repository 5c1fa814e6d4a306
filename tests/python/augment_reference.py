"""Prints the Pillow reference values that tests/augment_test.cpp checks the PIL-semantics image
operations of include/moca/data/transforms.hpp against. Needs Pillow (run with any recent
version; the committed values came from Pillow 13.0)."""
from PIL import Image, ImageEnhance, ImageOps


def pattern(h, w, c):
    """The test image: value (37x + 91y + 53c + 11xy) mod 256."""
    data = bytes((37 * x + 91 * y + 53 * ch + 11 * x * y) % 256
                 for y in range(h) for x in range(w) for ch in range(c))
    return Image.frombytes("L" if c == 1 else "RGB", (w, h), data)


def dump(name, img):
    vals = list(img.tobytes())
    print(f"// {name}: {img.size[1]}x{img.size[0]}x{len(img.getbands())}")
    print(f"const std::vector<int> {name} = {{{', '.join(map(str, vals))}}};")


def adjust_hue(img, factor):  # torchvision.transforms.functional_pil.adjust_hue
    h, s, v = img.convert("HSV").split()
    shift = int(factor * 255) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


grey = pattern(7, 9, 1)
rgb = pattern(7, 9, 3)
dump("kGreyDown", grey.resize((5, 4), Image.BILINEAR))
dump("kGreyUp", grey.resize((13, 11), Image.BILINEAR))
dump("kRgbDown", rgb.resize((4, 3), Image.BILINEAR))
dump("kRgbBicubic", rgb.resize((6, 5), Image.BICUBIC))
dump("kGreyBicubicUp", grey.resize((12, 10), Image.BICUBIC))
dump("kGreyBright", ImageEnhance.Brightness(grey).enhance(1.37))
dump("kRgbDark", ImageEnhance.Brightness(rgb).enhance(0.63))
dump("kGreyContrastLow", ImageEnhance.Contrast(grey).enhance(0.7))
dump("kRgbContrastHigh", ImageEnhance.Contrast(rgb).enhance(1.3))
dump("kRgbSaturation", ImageEnhance.Color(rgb).enhance(0.8))
dump("kRgbSaturationHigh", ImageEnhance.Color(rgb).enhance(1.2))
dump("kRgbHuePos", adjust_hue(rgb, 0.07))
dump("kRgbHueNeg", adjust_hue(rgb, -0.09))
dump("kRgbLuma", rgb.convert("L"))
dump("kRgbSolarize", ImageOps.solarize(rgb))
